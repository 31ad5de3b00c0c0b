"""Placement policies: where weights, KV cache and activations live, and whether that fits."""
from .placement import Policy, assign_tiers

__all__ = ["Policy", "assign_tiers"]
