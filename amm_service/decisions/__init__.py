"""Pure deciders over an immutable snapshot of the cluster: no network, no clock, no disk."""
