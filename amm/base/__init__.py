"""The layer that the client, the service and the agent all stand on.

The wire helpers shared by all three: checksums, chunk streams, server set-up, units, security.
"""
