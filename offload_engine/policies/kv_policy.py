"""What the KV cache keeps and how it is stored: the KV policy (full, H2O, HiP) and compression.

These are settings only; the engine's access objects (offload_engine/kv/) carry them out and the
memory plan (memory.py) sizes the cache from them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from offload_engine.errors import EngineError

# "sink": StreamingLLM's baseline at an H2O budget: the first tokens ("attention sinks") in place
# of the heavy hitters, plus the recent window; the eviction machinery is H2O's.
KV_POLICIES = ("full", "h2o", "sink", "hip")


# A per-token packed cache (H2O's slots) keeps each sequence's newest tokens exact beside its
# records and attends those instead (kv/recent.py): they matter most (KIVI).
RECENT_EXACT_TOKENS = 32


@dataclass(frozen=True)
class Compression:
    """Group-wise asymmetric quantization (FlexGen's: 4 bits, groups of 64).

    For weights, a checkpoint's own 4/8-bit blocks (GGUF Q4_0, Q4_1, Q8_0: groups of 32) are kept
    as they are, whatever `bits` and `group_size` say, unless `requantize`: they apply to the
    tensors the checkpoint stores in floating point."""

    bits: int = 4
    group_size: int = 64
    requantize: bool = False
    # KV cache only: KIVI's layout (kernels/quant/kivi.py), keys per channel over blocks of 32
    # tokens and values per token in groups of 32, the newest tokens exact until their block
    # fills; group_size does not apply. False: FlexGen's groups along the head dimension.
    keys_per_channel: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise EngineError(f"--quant-bits must be 2, 4 or 8, got {self.bits}.")
        if self.bits == 2 and self.group_size % 4:
            raise EngineError(f"2-bit groups pack four values a byte: --quant-group-size must be a multiple of 4, "
                              f"got {self.group_size}.")
        if self.group_size < 2 or self.group_size % 2:
            raise EngineError(f"--quant-group-size must be an even number >= 2, got {self.group_size}.")

    def record_bytes(self) -> int:
        return 4 + self.group_size * self.bits // 8

    def packed_bytes(self, numel_last: int, lead: int) -> int:
        """Bytes of a (lead, numel_last) tensor quantized along its last dimension (in groups of
        at most the row: see QuantSpec.for_length)."""
        spec = self.kernel_spec().for_length(numel_last)
        return lead * math.ceil(numel_last / spec.group_size) * spec.record_bytes

    def kernel_spec(self):
        from offload_engine.kernels.quant.pack import QuantSpec
        if self.keys_per_channel:
            from offload_engine.kernels.quant.kivi import kivi_spec
            return kivi_spec(self.bits)
        return QuantSpec(bits=self.bits, group_size=self.group_size)


# Tokens a ratio keeps at the least, of the heavy hitters and of the recent window each: a
# fraction of a short prompt (10% of 5 tokens) keeps too little to generate sensible text. A
# prompt shorter than the floor is kept whole; explicit sizes are taken as given.
RATIO_FLOOR_TOKENS = 16


@dataclass(frozen=True)
class H2OConfig:
    """Heavy hitters + recent tokens, as fractions of the prompt (the paper's knobs, each at least
    RATIO_FLOOR_TOKENS unless 0) or absolute sizes (taken as given).

    `simulate`: dense attention over the whole cache with the H2O mask applied (the paper's
    masked simulation; nothing is freed): the reference for the real eviction.
    `decay`: each decode step scales the scores by it before adding the step's attention: 1 is
    H2O's accumulated sum, which favours tokens that many queries have seen; 0 keeps the last
    step's attention alone (TOVA); in between, an exponential moving sum. None (the default):
    1 - 4 / budget, a time constant of a quarter of the budget, the best of the rules measured
    (SmolLM2-135M, experiments/NOTES.md): better perplexity than the sum and than the sink +
    recent baseline at every budget from 5% to 50% at 2048 and 8192 tokens. A prompt's tokens
    start from H2O's sums over the whole prompt (decayed sums there lost pass keys).
    """

    hh_ratio: float = 0.1
    recent_ratio: float = 0.1
    hh_size: int | None = None
    recent_size: int | None = None
    simulate: bool = False
    decay: float | None = None

    def __post_init__(self) -> None:
        for name in ("hh_ratio", "recent_ratio"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1):
                raise EngineError(f"--{name.replace('_', '-')} must be between 0 and 1, got {value}.")
        if self.decay is not None and not (math.isfinite(self.decay) and 0 <= self.decay <= 1):
            raise EngineError(f"--h2o-decay must be between 0 and 1, got {self.decay}.")
        for name in ("hh_size", "recent_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise EngineError(f"--{name.replace('_', '-')} must be >= 0, got {value}.")
        hh = ("--hh-size", self.hh_size) if self.hh_size is not None else ("--hh-ratio", self.hh_ratio)
        recent = ("--recent-size", self.recent_size) if self.recent_size is not None else \
            ("--recent-ratio", self.recent_ratio)
        if hh[1] == 0 and recent[1] == 0:
            raise EngineError(f"{hh[0]} 0 and {recent[0]} 0 give an H2O budget of 0 tokens: nothing would be kept "
                              "to attend.", "Keep at least one heavy hitter or recent token.")

    def sizes(self, prompt_len: int) -> tuple[int, int]:
        """(heavy hitters, recent) kept per sequence and KV head; at least one recent token."""
        hh = self.hh_size if self.hh_size is not None else _from_ratio(self.hh_ratio, prompt_len)
        recent = self.recent_size if self.recent_size is not None else _from_ratio(self.recent_ratio, prompt_len)
        return hh, max(1, recent)

    def budget(self, prompt_len: int) -> int:
        hh, recent = self.sizes(prompt_len)
        return hh + recent

    def score_decay(self, prompt_len: int) -> float:
        """The decay a decode step applies: as given, else 1 - 4 / budget (0 below 4 tokens)."""
        if self.decay is not None:
            return self.decay
        return max(0.0, 1 - 4 / self.budget(prompt_len))


def _from_ratio(ratio: float, prompt_len: int) -> int:
    """A fraction of the prompt, at least RATIO_FLOOR_TOKENS (none when the ratio is 0)."""
    return max(int(ratio * prompt_len), RATIO_FLOOR_TOKENS) if ratio > 0 else 0


@dataclass(frozen=True)
class HiPConfig:
    """HiP's knobs (defaults of the paper's v1.0 code): top-k tokens per query block, found by a
    tree search over key blocks; sink tokens and a sliding window always attended."""

    k: int = 512
    block_size_q: int = 32
    block_size_k: int = 2
    sink: int = 4
    window: int = 128
    refresh: int = 8  # decode steps between selections; in between the last one is reused
    dense_layers: int = 0  # the first layers attend densely
    gpu_cache_tokens: int | None = None  # hot-block cache per sequence and KV head; None: automatic
    exact: bool = False  # the exact top-k blocks from full scores: the upper bound of the estimate

    def __post_init__(self) -> None:
        for name in ("k", "block_size_q", "block_size_k", "refresh"):
            if getattr(self, name) < 1:
                raise EngineError(f"--hip-{name.replace('_size', '').replace('_', '-')} must be at least 1.")
        if self.k % self.block_size_k:
            raise EngineError(f"--hip-k {self.k} must be a multiple of --hip-block-k {self.block_size_k}.")
        if min(self.sink, self.window, self.dense_layers) < 0:
            raise EngineError("--hip-sink, --hip-window and --hip-dense-layers must be >= 0.")

    def working_set_blocks(self, group: int) -> int:
        """Blocks one decode step may need per (sequence, KV head): the union over the `group`
        query heads of a selection widened by the window's blocks since the last refresh."""
        return group * (self.kernel_config().max_selected + -(-self.refresh // self.block_size_k) + 1)

    def hot_blocks(self, group: int, max_len: int) -> int:
        """Block slots of the hot cache per (sequence, KV head) when the KV cache is off the GPU.

        By default twice one step's working set (O(k) tokens: the tree search itself reads only the
        block-start keys, which stay on the GPU apart from this cache), never more than the whole
        cache: room for the blocks of the previous selection to stay while the next one arrives.
        """
        bk = self.block_size_k
        need = self.working_set_blocks(group)
        blocks = -(-max_len // bk)
        if self.gpu_cache_tokens is not None:
            asked = -(-self.gpu_cache_tokens // bk)
            if asked < min(need, blocks):
                raise EngineError(f"--hip-gpu-cache {self.gpu_cache_tokens} tokens is below one step's working set "
                                  f"of {min(need, blocks) * bk} tokens per sequence and KV head.",
                                  f"Pass at least {min(need, blocks) * bk}, or lower --hip-k / --hip-window.")
            return min(asked, blocks)
        return min(2 * need, blocks)

    def hot_cache_bytes(self, batch: int, kv_heads: int, group: int, head_dim: int, max_len: int,
                        itemsize: int) -> int:
        """GPU bytes of one item's hot cache (offload_engine/kv/hot_cache.py): the block-start keys
        (plus one spare row), the key and value pool (plus one spare block) and the int64 maps
        (plus spare columns)."""
        bk, cap = self.block_size_k, self.hot_blocks(group, max_len)
        blocks = -(-max_len // bk)
        per_head = ((blocks + 1) * head_dim + 2 * (cap + 1) * bk * head_dim) * itemsize + (blocks + 1 + 2 * (cap + 1)) * 8
        return batch * kv_heads * per_head

    def kernel_config(self):
        from offload_engine.kernels.hip.select import HipConfig
        return HipConfig(k=self.k, block_size_q=self.block_size_q, block_size_k=self.block_size_k,
                         sink=self.sink, window=self.window)


@dataclass(frozen=True)
class KVSettings:
    """Everything about the KV cache that is not placement."""

    policy: str = "full"
    h2o: H2OConfig | None = None
    hip: HiPConfig | None = None

    def __post_init__(self) -> None:
        if self.policy not in KV_POLICIES:
            raise EngineError(f"--kv-policy must be one of {', '.join(KV_POLICIES)}, got '{self.policy}'.")
        if not isinstance(self.h2o, (H2OConfig, type(None))) or not isinstance(self.hip, (HiPConfig, type(None))):
            raise TypeError("KVSettings(policy, h2o=H2OConfig(...), hip=HiPConfig(...)): a config in the wrong field.")
        if self.policy == "h2o" and self.h2o is None:
            object.__setattr__(self, "h2o", H2OConfig())
        if self.policy == "sink" and self.h2o is None:
            object.__setattr__(self, "h2o", H2OConfig(hh_size=4))
        if self.policy == "hip" and self.hip is None:
            object.__setattr__(self, "hip", HiPConfig())

    @property
    def evicts(self) -> bool:
        """H2O and the sink baseline keep a budget of tokens and free the rest."""
        return self.policy in ("h2o", "sink")

    def kept_tokens(self, prompt_len: int) -> dict[str, float] | None:
        """H2O's (or the sink baseline's) budget in tokens per sequence and KV head, and H2O's
        score decay, as result files record them; None for policies that keep everything they select."""
        if not self.evicts:
            return None
        hh, recent = self.h2o.sizes(prompt_len)
        kept = {"heavy_hitters": hh, "recent": recent, "tokens": hh + recent}
        return kept if self.policy == "sink" else {**kept, "score_decay": self.h2o.score_decay(prompt_len)}

    def describe_budget(self, prompt_len: int) -> str | None:
        """The budget as one line for the start-up report."""
        kept = self.kept_tokens(prompt_len)
        if kept is None:
            return None
        name, first = ("sink", "sink tokens") if self.policy == "sink" else ("H2O", "heavy hitters")
        decay = f"; scores decayed by {kept['score_decay']:.4g} a step" if "score_decay" in kept else ""
        return (f"{name} budget: {kept['heavy_hitters']} {first} + {kept['recent']} recent = {kept['tokens']} tokens "
                f"per sequence and KV head (prompt of {prompt_len} tokens){decay}")

    @property
    def capturable(self) -> bool:
        """Whether a decode step with this policy can be captured in a CUDA graph: a fixed set of
        slots (everything, or H2O's budget with real eviction), or HiP's selection in fixed
        buffers (kv/hip_static.py); not H2O's masked simulation or HiP's exact top-k."""
        if self.policy == "hip":
            return not self.hip.exact
        return self.policy == "full" or (self.evicts and not self.h2o.simulate)

    def cache_len(self, prompt_len: int, max_len: int) -> int:
        """Token slots the cache of one sequence holds.

        H2O keeps `budget` tokens between steps, plus one slot for the incoming token (it is
        attended before the lowest-scoring entry is evicted); with a budget >= the sequence it
        is the full cache.
        """
        if self.evicts and not self.h2o.simulate:
            return min(max_len, self.h2o.budget(prompt_len) + 1)
        return max_len

    def prefill_tokens(self, prompt_len: int, max_len: int) -> int:
        """Token slots written at prefill: H2O fills its whole (small) cache, zeros beyond the kept."""
        cache_len = self.cache_len(prompt_len, max_len)
        if self.evicts and not self.h2o.simulate:
            return cache_len
        return min(prompt_len, cache_len)
