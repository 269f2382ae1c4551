"""Sharing the event loop: pacing big steps so that other work gets a turn, keeping the garbage
collector out of them, and the probe that finds the steps that hold the loop anyway."""
