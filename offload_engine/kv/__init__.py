"""The KV cache: where it is stored (store.py), how tokens are encoded (codec.py), and the KV
policies whose access objects layers reach through `LayerContext.kv`: full attention
(dense.py), heavy-hitter eviction (h2o.py), hierarchically pruned attention (hip.py)."""
from __future__ import annotations

from .codec import make_codec
from .dense import DenseKV
from .store import CacheLocation, KVCacheStore

__all__ = ["CacheLocation", "DenseKV", "KVCacheStore", "make_codec", "make_kv_policy"]


def make_kv_policy(settings, codec, profiler, layers, workload, device, attention_offset: int = 0):
    """The access-object factory for a policy's KV settings. `attention_offset`: attention layers
    before `layers[0]` in the whole model (a pipeline stage's), so per-layer settings stay global."""
    if settings.policy == "full":
        return DenseKV(codec, profiler)
    if settings.evicts:
        from .h2o import H2OKV
        return H2OKV(settings.h2o, codec, profiler, workload, sinks=settings.policy == "sink")
    from .hip import HiPKV
    return HiPKV(settings.hip, codec, profiler, layers, workload, device, attention_offset)
