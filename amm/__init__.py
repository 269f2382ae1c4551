"""amm: a standalone Active Memory Manager for clusters of workers that hold keyed data in memory.

``from amm import Client`` is what users import; ``amm.v1`` is the generated wire contract.
"""
