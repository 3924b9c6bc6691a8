"""HCCL rank tables: generate (per server), merge, validate, and plan whole clusters."""
