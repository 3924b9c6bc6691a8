"""Sparse layers: routing table, routers, token dispatcher, batched experts, and the MoE layer."""
