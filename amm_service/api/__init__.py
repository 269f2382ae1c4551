"""The gRPC surface of the AMM: the server that wires the parts, and the control servicer."""
