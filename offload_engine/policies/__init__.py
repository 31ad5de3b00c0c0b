"""Policies: where weights, KV cache and activations live, what the KV cache keeps, and whether it fits."""
from .kv_policy import Compression, H2OConfig, HiPConfig, KVSettings
from .placement import Policy, assign_tiers

__all__ = ["Policy", "assign_tiers", "Compression", "H2OConfig", "HiPConfig", "KVSettings"]
