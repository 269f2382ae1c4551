"""Generated from protos/amm/v1 by scripts/gen_protos.py. Do not edit."""
