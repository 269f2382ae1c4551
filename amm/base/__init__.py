"""The layer that the client, the service and the agent all stand on: wire helpers shared by all three."""
