"""The AMM's moving parts, in layers that import only downwards (the ``.importlinter`` contract).

``manager`` wires them together and ``metrics`` serves its numbers; below them ``cycles``, then
``workers`` and ``observe`` side by side, then ``links`` to the agents, ``records``, ``loop``.
"""
