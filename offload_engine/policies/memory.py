"""Memory planning: which tier holds each tensor, the bytes each tier needs, and refusal.

Everything the engine allocates is decided here first, so a policy that does not fit is
refused before a single byte is allocated, with the tier, the shortfall and what to change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from offload_engine.errors import EngineError, format_size, require_int
from offload_engine.models.base import Layer
from offload_engine.io.tiers import Tier, round_up, tensor_bytes

from .placement import EvenSplit, Policy, assign_tiers

GiB = float(1 << 30)
MiB = float(1 << 20)
LIBRARY_WORKSPACE = 64 << 20  # cuBLAS / attention workspaces, allocated by the libraries on first use


@dataclass(frozen=True)
class Workload:
    """Tokens per sequence: the prompt and the tokens generated after it (the last of which is
    never fed back, so a model runs prompt_len + gen_len - 1 positions)."""

    prompt_len: int
    gen_len: int

    def __post_init__(self) -> None:
        require_int(self.prompt_len, "--prompt-len (Workload.prompt_len)", 1)
        require_int(self.gen_len, "--gen-len (Workload.gen_len)", 1)

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.gen_len


@dataclass
class TierBudget:
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    buffers: int = 0  # staging slots for streamed weights / KV cache
    working: int = 0  # transient tensors of one layer's forward
    hot_cache: int = 0  # HiP: block-start keys and hot blocks of a KV cache kept off the GPU

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.buffers + self.working + self.hot_cache

    def describe(self) -> str:
        parts = [("weights", self.weights), ("KV cache", self.kv_cache), ("HiP hot cache", self.hot_cache),
                 ("activations", self.activations), ("staging buffers", self.buffers),
                 ("working memory", self.working)]
        return ", ".join(f"{name} {format_size(b)}" for name, b in parts if b)


@dataclass
class MemoryPlan:
    """Tier of every weight, KV cache and activation buffer, and the bytes per tier.

    KV cache items and activation buffers are equal-sized, so their tiers are computed from
    their index (`EvenSplit`), never listed: the plan costs the same for any batch count.
    """

    weight_tiers: dict[str, Tier]  # checkpoint key -> tier (shared tensors appear once)
    kv_layers: list[int]  # indices of the layers that hold a KV cache
    num_gpu_batches: int
    kv_split: EvenSplit  # over (attention layer, gpu batch) items, layer-major
    act_split: EvenSplit  # over gpu batches
    weight_slot_bytes: int  # one staging slot: the largest layer's streamed weights
    weight_slots: int
    kv_slots: int  # GPU slots for streamed KV cache
    kv_staging_slots: int  # pinned host buffers for writing prompts into head-major CPU caches
    kv_scratch_slots: int = 0  # pinned host buffers for per-head token writes (H2O) to CPU/disk homes
    cache_len: int = 0  # token slots per sequence in each KV item
    prefill_tokens: int = 0  # token slots written per sequence at prefill
    prefill_chunk: int = 0  # prompt tokens per layer forward at prefill
    prefill_buffer_tokens: int = 0  # a chunked prefill's GPU buffer of the prompt (0: none needed)
    weight_formats: dict[str, tuple[int, int]] = field(default_factory=dict)  # kept in the checkpoint's blocks
    compressed_weights: set[str] = field(default_factory=set)  # checkpoint keys stored packed
    tiers: dict[Tier, TierBudget] = field(default_factory=lambda: {t: TierBudget() for t in Tier})
    kv_blocks: int = 1  # a pipeline stage keeps KV cache for several blocks of gpu batches
    disk_store_bytes: int = 0  # compute-device memory that queued disk writes may hold (transfer.Mover)

    @property
    def kv_batches(self) -> int:
        """GPU batches with a KV cache: num_gpu_batches per block, blocks in flight on a pipeline stage."""
        return self.num_gpu_batches * self.kv_blocks

    def kv_tier(self, layer: int, batch: int) -> Tier:
        return self.kv_split.tier(self.kv_layers.index(layer) * self.kv_batches + batch)

    @property
    def kv_tiers(self) -> dict[tuple[int, int], Tier]:
        """(layer, gpu batch) -> tier for every item; build only for a plan that fits."""
        k = self.kv_batches
        return {(j, b): self.kv_split.tier(a * k + b) for a, j in enumerate(self.kv_layers) for b in range(k)}

    @property
    def act_tiers(self) -> list[Tier]:
        return [self.act_split.tier(k) for k in range(self.num_gpu_batches)]

    @property
    def model_bytes(self) -> int:
        return sum(b.weights for b in self.tiers.values())

    @property
    def cache_bytes(self) -> int:
        return sum(b.kv_cache for b in self.tiers.values())

    def persistent_bytes(self, tier: Tier) -> int:
        """What the engine allocates up front on a tier (all but transient working memory)."""
        b = self.tiers[tier]
        return b.weights + b.kv_cache + b.activations + b.buffers + b.hot_cache

    def check(self, gpu_bytes: int, cpu_bytes: int, disk_bytes: int, shared: int | None = None) -> None:
        """Refuse a plan that does not fit the caps; `shared`: the host memory that the GPU and CPU
        tiers both come out of when the "GPU" is the CPU (their sum must fit it too)."""
        slots = ""
        if self.weight_slots > 2:  # only an explicit --weight-buffers asks for more than the automatic choice
            slots = (f" or lower --weight-buffers (its {self.weight_slots} staging slots hold "
                     f"{format_size(self.weight_slots * self.weight_slot_bytes)})")
        hints = {
            Tier.GPU: ("--gpu-mem", "move weights or KV cache off the GPU (lower the 1st or 3rd --percent value) "
                       f"or lower --gpu-batch-size{slots}"),
            Tier.CPU: ("--cpu-mem", "move weights or KV cache to disk (lower the 2nd or 4th --percent value) "
                       "or lower --gpu-batch-size / --num-gpu-batches"),
            Tier.DISK: ("--offload-dir", "free disk space, point --offload-dir elsewhere, or keep more on GPU/CPU"),
        }
        for tier, cap in ((Tier.GPU, gpu_bytes), (Tier.CPU, cpu_bytes), (Tier.DISK, disk_bytes)):
            need = self.tiers[tier].total
            if need > cap:
                flag, fix = hints[tier]
                raise EngineError(
                    f"policy does not fit: the {tier.value.upper()} tier needs {format_size(need)} "
                    f"({self.tiers[tier].describe()}) but {format_size(cap)} are available ({flag}), "
                    f"{format_size(need - cap)} short.", f"To fix: {fix}.")
        self._check_shared(shared, slots)

    def _check_shared(self, shared: int | None, slots: str) -> None:
        if shared is None:
            return
        gpu, cpu = self.tiers[Tier.GPU].total, self.tiers[Tier.CPU].total
        if gpu + cpu > shared:
            raise EngineError(
                f"policy does not fit: without a GPU the GPU and CPU tiers share host memory, and they need "
                f"{format_size(gpu)} + {format_size(cpu)} = {format_size(gpu + cpu)} but {format_size(shared)} "
                f"is available, {format_size(gpu + cpu - shared)} short.",
                "To fix: move weights or KV cache to disk (lower the first four --percent values) "
                f"or lower --gpu-batch-size / --num-gpu-batches{slots}.")


def weight_bytes(spec, policy: Policy, itemsize: int, stored: tuple[int, int] | None = None) -> int:
    """Bytes of one weight in storage: packed when compressed (2-D weights only), in the
    checkpoint's own (bits, group size) where it keeps them (`stored`)."""
    if policy.compress_weight is not None and len(spec.shape) == 2:
        if stored is not None:
            from dataclasses import replace
            return replace(policy.compress_weight, bits=stored[0], group_size=stored[1]).packed_bytes(
                spec.shape[1], spec.shape[0])
        return policy.compress_weight.packed_bytes(spec.shape[1], spec.shape[0])
    return spec.numel() * itemsize


def kv_token_bytes(num_heads: int, head_dim: int, policy: Policy, itemsize: int) -> int:
    """Bytes of one cached token's keys (or values) for one sequence: packed when compressed."""
    if policy.compress_cache is not None:
        return policy.compress_cache.packed_bytes(head_dim, num_heads)
    return num_heads * head_dim * itemsize


def plan_memory(layers: list[Layer], policy: Policy, work: Workload, dtype: torch.dtype,
                hidden_size: int, weight_slots: int = 2, relay_bytes: int = 0, kv_blocks: int = 1,
                pipeline_hidden: int = 0, prefill_chunk: int | None = None,
                weight_formats: dict[str, tuple[int, int]] | None = None) -> MemoryPlan:
    """`relay_bytes`: the pinned ring of the disk relay (counted as CPU buffers when disk is used);
    `kv_blocks`: blocks of gpu batches whose KV cache a pipeline stage keeps; `pipeline_hidden`:
    GPU batches' hidden states a pipeline stage holds for its traffic (see Engine._plan);
    `prefill_chunk`: prompt tokens a layer's forward takes at a time (None: the whole prompt);
    `weight_formats`: (bits, group size) of the weights kept in the checkpoint's own blocks."""
    itemsize = torch.empty((), dtype=dtype).element_size()

    # Weights: one entry per checkpoint key, in layer order.
    specs = {s.key: s for layer in layers for s in layer.weight_specs()}
    formats = weight_formats or {}
    sizes = {key: weight_bytes(spec, policy, itemsize, formats.get(key)) for key, spec in specs.items()}
    keys = list(sizes)
    weight_tiers = dict(zip(keys, assign_tiers([sizes[k] for k in keys],
                                               policy.weight_gpu_percent, policy.weight_cpu_percent)))
    streamed = [sum(round_up(sizes[s.key]) for s in {s.key: s for s in layer.weight_specs()}.values()
                    if weight_tiers[s.key] != Tier.GPU) for layer in layers]
    weight_slot = max(streamed)

    # KV cache: one item per (attention layer, gpu batch), layer-major, `cache_len` token slots each.
    b, k_batches = policy.gpu_batch_size, policy.num_gpu_batches
    attn = [(i, layer.kv_spec) for i, layer in enumerate(layers) if layer.kv_spec is not None]
    cache_len = policy.kv.cache_len(work.prompt_len, work.max_len)
    kv_item = prompt_item = scratch_item = meta_item = 0
    if attn:
        spec = attn[0][1]
        token = kv_token_bytes(spec.num_heads, spec.head_dim, policy, itemsize)
        kv_item = 2 * cache_len * b * token
        prompt_item = 2 * policy.kv.prefill_tokens(work.prompt_len, work.max_len) * b * token
        scratch_item = 2 * b * token + b * spec.num_heads * 8
        if policy.kv.evicts:  # float32 score and int32 position per slot, beside the attention
            meta_item = b * spec.num_heads * cache_len * 8
    kv_split = EvenSplit(len(attn) * k_batches * kv_blocks, policy.cache_gpu_percent, policy.cache_cpu_percent)
    kv_counts = kv_split.counts() if attn else {t: 0 for t in Tier}
    off_gpu = kv_counts[Tier.DISK] + (0 if policy.cpu_cache_compute else kv_counts[Tier.CPU])  # GPU-attended
    hot_item = 0
    if policy.kv.policy == "hip" and attn and off_gpu:  # HiP keeps a hot-block cache instead of streaming
        spec = attn[0][1]
        hot_item = policy.kv.hip.hot_cache_bytes(b, spec.num_heads, spec.group, spec.head_dim, work.max_len, itemsize)
    fetched_kv = off_gpu > 0 and not hot_item
    cpu_attended = policy.cpu_cache_compute and kv_counts[Tier.CPU] > 0
    # A chunked prefill gathers the prompt's keys and values on the GPU where the cache cannot
    # serve the next chunk itself (kv/store.py: prompt_buffer): off the GPU, packed, or evicting.
    chunk = work.prompt_len if prefill_chunk is None else min(prefill_chunk, work.prompt_len)
    buffered = chunk < work.prompt_len and attn and (
        policy.kv.evicts or policy.compress_cache is not None or kv_counts[Tier.GPU] < kv_split.count)
    buffer_bytes = 2 * work.prompt_len * b * attn[0][1].num_heads * attn[0][1].head_dim * itemsize if buffered else 0
    scatters = policy.kv.evicts and (kv_counts[Tier.CPU] + kv_counts[Tier.DISK]) > 0

    # Activations: the hidden states between layers, one buffer per gpu batch.
    act_item = tensor_bytes((b, work.prompt_len, hidden_size), dtype)
    act_split = EvenSplit(k_batches, policy.act_gpu_percent, policy.act_cpu_percent)
    act_counts = act_split.counts()

    weight_slots = weight_slots if weight_slot else 0
    plan = MemoryPlan(weight_tiers, [i for i, _ in attn], k_batches, kv_split, act_split, weight_slot, weight_slots,
                      kv_slots=2 if fetched_kv else 0, kv_staging_slots=2 if cpu_attended else 0,
                      kv_scratch_slots=2 if scatters else 0, cache_len=cache_len,
                      prefill_tokens=policy.kv.prefill_tokens(work.prompt_len, work.max_len),
                      prefill_chunk=chunk, prefill_buffer_tokens=work.prompt_len if buffered else 0,
                      weight_formats={k: f for k, f in formats.items() if k in keys and policy.compress_weight
                                      is not None and len(specs[k].shape) == 2},
                      compressed_weights={k for k in keys if policy.compress_weight is not None
                                          and len(specs[k].shape) == 2}, kv_blocks=kv_blocks)
    for key, tier in weight_tiers.items():
        plan.tiers[tier].weights += sizes[key]
    for tier in Tier:
        plan.tiers[tier].kv_cache += kv_counts[tier] * kv_item
        if tier != Tier.GPU:  # GPU-resident hidden states are transient: counted as working memory
            plan.tiers[tier].activations += act_counts[tier] * act_item
    # H2O's scores live where attention runs: on the CPU for CPU-attended items, else the GPU.
    cpu_meta = kv_counts[Tier.CPU] if policy.cpu_cache_compute else 0
    plan.tiers[Tier.CPU].kv_cache += cpu_meta * meta_item
    plan.tiers[Tier.GPU].kv_cache += (kv_split.count - cpu_meta if attn else 0) * meta_item
    if attn and policy.compress_cache is not None and (policy.compress_cache.keys_per_channel or policy.kv.evicts):
        # The newest tokens, exact, beside each item's attention (kv/recent.py): KIVI's unfinished
        # block, or H2O's ring over its packed slots
        from offload_engine.kernels.quant.kivi import BLOCK
        from .kv_policy import RECENT_EXACT_TOKENS
        tokens = BLOCK if policy.compress_cache.keys_per_channel else RECENT_EXACT_TOKENS
        recent_item = 2 * tokens * b * attn[0][1].num_heads * attn[0][1].head_dim * itemsize
        plan.tiers[Tier.CPU].kv_cache += cpu_meta * recent_item
        plan.tiers[Tier.GPU].kv_cache += (kv_split.count - cpu_meta) * recent_item
    plan.tiers[Tier.GPU].hot_cache += off_gpu * hot_item
    gpu = plan.tiers[Tier.GPU]
    gpu.buffers = weight_slots * weight_slot + plan.kv_slots * kv_item + buffer_bytes
    plan.tiers[Tier.CPU].buffers = plan.kv_staging_slots * prompt_item + plan.kv_scratch_slots * scratch_item \
        + relay_bytes
    # Working memory: the largest layer forward, its input and output, the resident hidden
    # states of the other gpu batches, the attention mask and one prefetched input.
    layer_work = max(layer.working_bytes(b, chunk, itemsize) for layer in layers)
    mask = b * chunk * work.prompt_len
    # A chunked prefill writes a layer's output over its input (schedule.py), one hidden-state buffer less.
    inputs_outputs = 2 if chunk < work.prompt_len else 3
    gpu.working = layer_work + inputs_outputs * act_item + mask + act_item * act_counts[Tier.GPU] + LIBRARY_WORKSPACE
    gpu.working += pipeline_hidden * act_item
    # Writes to disk hold their source until the disk takes it: one prompt's K and V and one gpu
    # batch's hidden states may wait beside the next layer's working memory.
    plan.disk_store_bytes = (prompt_item if kv_counts[Tier.DISK] else 0) + (act_item if act_counts[Tier.DISK] else 0)
    gpu.working += plan.disk_store_bytes
    if policy.cpu_cache_compute and attn:
        spec = attn[0][1]
        plan.tiers[Tier.CPU].working = 4 * b * spec.num_heads * (work.max_len + 2 * spec.head_dim) * 4
    return plan


def size_floor(model, policy: Policy, work: Workload, dtype: torch.dtype, kv_blocks: int = 1) -> tuple[int, int]:
    """(weights, KV cache) bytes of the whole model, summed over the tiers, without building its
    layer list: both grow by the same amount with every block, so the layers of one and of two
    blocks give them for any count (a billion-layer config is sized in microseconds)."""
    from dataclasses import replace

    from offload_engine.models import build_layers

    itemsize = torch.empty((), dtype=dtype).element_size()

    def sizes(num_layers: int) -> tuple[int, int]:
        layers = build_layers(replace(model, num_layers=num_layers), policy.sep_layer)
        specs = {s.key: s for layer in layers for s in layer.weight_specs()}
        attn = [layer.kv_spec for layer in layers if layer.kv_spec is not None]
        token = kv_token_bytes(attn[0].num_heads, attn[0].head_dim, policy, itemsize) if attn else 0
        items = len(attn) * policy.num_gpu_batches * kv_blocks
        cache_len = policy.kv.cache_len(work.prompt_len, work.max_len)
        return sum(weight_bytes(s, policy, itemsize) for s in specs.values()), items * 2 * cache_len * \
            policy.gpu_batch_size * token

    (w1, c1), (w2, c2) = sizes(1), sizes(2)
    n = model.num_layers
    return w1 + (n - 1) * (w2 - w1), c1 + (n - 1) * (c2 - c1)
