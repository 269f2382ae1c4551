"""Talking to the agents: their addresses, one channel each, the directive streams and the polls
that merge their inventories into the cluster state."""
