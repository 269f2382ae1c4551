"""The workers' lifecycle: registering and unregistering, liveness verdicts, and retirements with
the handing over of a retiring worker's keys."""
