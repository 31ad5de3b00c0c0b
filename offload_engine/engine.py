"""The engine: plans memory, places weights, and runs batched generation.

    with Engine(ModelConfig, Policy, Workload(prompt_len, gen_len), EngineOptions(...)) as engine:
        result = engine.generate(input_ids, attention_mask, GenerationConfig(max_new_tokens=32))

An engine holds pinned host memory and offload files until `close()` (or the end of the `with`
block, or garbage collection, or interpreter exit: a finalizer runs `close()` then).
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch
from tqdm import tqdm

from offload_engine.policies.memory import MemoryPlan, Workload, plan_memory, size_floor
from offload_engine.policies.placement import Policy

from .activations import ActivationStore
from .batch import BatchState
from .decode_graph import DecodeGraph, graphs_apply
from .config import ModelConfig
from .errors import EngineError, format_size
from .kv import KVCacheStore, make_codec, make_kv_policy
from .models import build_layers
from .profiler import Profiler, mean_split
from .sampling import GenerationConfig, sample
from .schedule import Scheduler
from .io.tiers import DeviceStorage, DiskStorage, HostStorage, Tier, disk_capacity
from .io.disk_relay import DiskRelay, DiskRelaySettings
from .io.transfer import Mover
from .weight_store import WeightStore
from .weights import dummy_weights, load_checkpoint


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, logits (N, V), tokens (N,))


@dataclass
class EngineOptions:
    checkpoint: Path | None = None  # None: dummy weights
    seed: int = 0
    dtype: torch.dtype | None = None  # default: float16 on a GPU, float32 on the CPU
    device: str | None = None  # default: cuda if available
    offload_dir: Path = Path("offload_dir")
    gpu_mem_bytes: int | None = None  # caps; default: what the machine has
    cpu_mem_bytes: int | None = None
    profile: bool = False
    progress: bool = True
    eager_static_decode: bool = False  # run the graph-capturable decode step without capturing (tests)
    cold_disk: bool = False  # evict the disk tier from the page cache before every step (benchmarks)
    disk_relay: DiskRelaySettings = field(default_factory=lambda: DiskRelaySettings())
    # Prompt tokens a layer's forward takes at a time at prefill; None: the whole prompt when
    # the plan fits, else the largest power of two (>= 64) that does.
    prefill_chunk: int | None = None
    # Plan only: the caps are taken as given (they may describe another machine) and nothing is
    # allocated; the engine holds its plan and cannot generate.
    dry_run: bool = False


@dataclass(frozen=True)
class StageSlice:
    """The part of the model one pipeline stage runs: a contiguous range of the layer list, and
    the micro-batches (blocks of gpu_batch_size x num_gpu_batches sequences) it keeps KV cache for."""

    layers: range
    blocks: int = 1


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # (N, new tokens), on the CPU
    prefill_s: float
    decode_s: float
    step_logits: list[torch.Tensor] = field(default_factory=list)  # per step (N, V), if collected
    prompt_logits: torch.Tensor | None = None  # (N, s, V), if collected
    decode_split_s: dict[str, float] = field(default_factory=dict)  # busy seconds per decode step, by category


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EngineError(f"unknown device '{name}'.", "Use cpu, cuda or cuda:N.") from None
    if dev.type not in ("cpu", "cuda"):
        raise EngineError(f"device '{name}' is not supported.", "Use cpu, cuda or cuda:N.")
    if dev.type == "cuda":
        if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            raise EngineError(f"--device {name} was asked for but no such CUDA GPU is visible.",
                              "Drop --device to use what the machine has.")
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)  # streams and events below are created on the current device
    return dev


def describe_gpu_tier(name: str | None) -> str:
    """The start-up line saying which device the "GPU" tier is."""
    dev = resolve_device(name)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return f"GPU tier: {props.name} ({format_size(props.total_memory)})"
    why = "--device cpu" if name is not None and torch.cuda.is_available() else "no GPU found"
    return f"GPU tier: the CPU ({why}; shares host memory with the CPU tier)"


class Engine:
    def __init__(self, model: ModelConfig, policy: Policy, workload: Workload, options: EngineOptions | None = None,
                 stage: StageSlice | None = None):
        """`stage`: build only these layers, for a pipeline stage (driven through `scheduler.step`)."""
        opts = options or EngineOptions()
        model.validate()  # a config built in Python is checked as one read from a file is
        self.model, self.policy, self.workload, self.options = model, policy, workload, opts
        self.device = resolve_device(opts.device)
        self.dtype = opts.dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if workload.max_len - 1 > model.max_positions:  # the last generated token is never fed back
            raise EngineError(f"prompt + generated length {workload.max_len} exceeds {model.name}'s "
                              f"{model.max_positions} positions.", "Lower --prompt-len or --gen-len.")
        self._check_hip_layers(model)
        if stage is None:  # sized arithmetically first: an absurd model is refused before its layers exist
            self._refuse_oversized(opts)
        layers = build_layers(model, policy.sep_layer)
        self.pipelined, self.num_layers = stage is not None, len(layers)
        self.stage = stage or StageSlice(range(len(layers)))
        self.attention_offset = sum(layer.kv_spec is not None for layer in layers[:self.stage.layers.start])
        self.all_weight_keys = {s.key for layer in layers for s in layer.weight_specs()}
        self.layers = layers[self.stage.layers.start:self.stage.layers.stop]
        self.weight_formats = self._kept_blocks(opts)
        self.plan: MemoryPlan = self._plan(opts)
        self._check_hip_placement()
        if opts.dry_run:  # planned, never allocated: nothing to generate with or release
            self._finalizer = weakref.finalize(self, lambda: None)
            self._finalizer()
            return

        self.profiler = Profiler(opts.profile)
        self.disk = DiskStorage(Path(opts.offload_dir), self.plan.persistent_bytes(Tier.DISK))
        self.cold_disk_resident: list[float | None] = []  # with cold_disk: the disk tier resident after each eviction
        relay = None
        if policy.uses_disk:
            r = self.relay_settings
            relay = DiskRelay(r.ring_bytes, r.chunk_bytes, r.threads, direct=r.direct, device=self.device)
        self.mover = Mover(self.device, policy.overlap, self.profiler, relay=relay, disk=self.disk,
                           disk_store_budget=self.plan.disk_store_bytes)
        cpu = self.plan.tiers[Tier.CPU]
        pinned = self.plan.persistent_bytes(Tier.CPU) - (0 if policy.pin_weight else cpu.weights)
        on_gpu = self.device.type == "cuda"  # pinning serves copies to a GPU only
        self.storages = {Tier.GPU: DeviceStorage(self.device), Tier.CPU: HostStorage(on_gpu, pinned), Tier.DISK: self.disk}
        self.weight_host = self.storages[Tier.CPU] if policy.pin_weight else HostStorage(pin=False)
        # Runs close() once: explicitly, on garbage collection, or at interpreter exit.
        capped = self.device if self.device.type == "cuda" and opts.gpu_mem_bytes else None
        self._finalizer = weakref.finalize(self, _release, self.mover, self.disk,
                                           (self.storages[Tier.CPU], self.weight_host), capped)
        try:
            self._allocate_and_load(opts)
        except BaseException:
            self.close()  # no offload files or pinned memory left behind
            raise

    @classmethod
    def from_pretrained(cls, model, policy: Policy | None = None, max_prompt_len: int = 512,
                        max_new_tokens: int = 128, options: EngineOptions | None = None) -> "Engine":
        """An engine for a checkpoint with its tokenizer: `engine.generate(["text", ...])` returns text."""
        from .text import from_pretrained
        return from_pretrained(model, policy, max_prompt_len, max_new_tokens, options)

    def _allocate_and_load(self, opts: EngineOptions) -> None:
        policy, workload, model, storages = self.policy, self.workload, self.model, self.storages
        weight_storages = {**storages, Tier.CPU: self.weight_host}
        weight_quant = policy.compress_weight.kernel_spec() if policy.compress_weight else None
        self.weights = WeightStore(self.layers, self.plan, weight_storages, self.dtype, self.mover, weight_quant,
                                   self.device)
        specs = {s.key: s for layer in self.layers for s in layer.weight_specs()}
        if opts.checkpoint is not None:
            load_checkpoint(opts.checkpoint, specs, self.weights, model.tie_word_embeddings, opts.progress,
                            other_keys=self.all_weight_keys - set(specs))
        else:
            dummy_weights(specs, self.weights, opts.seed, self.device, opts.progress)
        codec = make_codec(policy.compress_cache, self.dtype, model.head_dim)
        self.kv = KVCacheStore(self.layers, self.plan, storages, policy.gpu_batch_size, workload.prompt_len,
                               self.plan.cache_len, codec, self.mover, self.profiler, policy.cpu_cache_compute)
        self.kv.policy = make_kv_policy(policy.kv, codec, self.profiler, self.layers, workload, self.device,
                                        self.attention_offset)
        self.acts = ActivationStore(self.plan.act_tiers, storages,
                                    policy.gpu_batch_size * workload.prompt_len * model.hidden_size,
                                    self.dtype, self.device, self.mover)
        self.scheduler = Scheduler(self.layers, self.weights, self.kv, self.acts, self.profiler, self.device)
        if self.plan.prefill_chunk < workload.prompt_len:
            self.scheduler.prefill_chunk = self.plan.prefill_chunk
        self.states = [BatchState(policy.gpu_batch_size, workload.max_len, self.device)
                       for _ in range(policy.num_gpu_batches * self.stage.blocks)]
        self.graph_refusal = graphs_apply(policy, self.plan, self.device, opts.profile) \
            if not self.pipelined else "a pipeline stage runs its steps eagerly"
        on_gpu = self.device.type == "cuda"
        self.decode_graph = DecodeGraph(self.scheduler, self.states, self.device, eager=opts.eager_static_decode) \
            if self.graph_refusal is None and (on_gpu or opts.eager_static_decode) else None
        self.acts.decode_on_gpu = self.decode_graph is not None

    def _plan(self, opts: EngineOptions) -> MemoryPlan:
        """The memory plan, refused before any allocation if it does not fit.

        Streamed weights get a third staging slot when it fits: it lets the next two layers load
        while one computes, which hides the load of a small layer behind a slow one.
        """
        caps, pool = self._caps(opts), self._shared_pool()
        error = None
        self.relay_settings, relay = None, 0
        if self.policy.uses_disk:  # the disk tier's size does not depend on the ring or the slots
            disk = plan_memory(self.layers, self.policy, self.workload, self.dtype, self.model.hidden_size,
                               kv_blocks=self.stage.blocks, pipeline_hidden=self._pipeline_hidden(),
                               weight_formats=self.weight_formats)
            self.relay_settings = opts.disk_relay.fitted(disk.tiers[Tier.DISK].total)
            relay = self.relay_settings.host_bytes()
        attempts = [(chunk, slots) for chunk in self._prefill_chunks(opts)
                    for slots in ([self.policy.weight_buffers] if self.policy.weight_buffers else [3, 2])]
        for chunk, slots in attempts:
            plan = plan_memory(self.layers, self.policy, self.workload, self.dtype, self.model.hidden_size, slots,
                               relay_bytes=relay, kv_blocks=self.stage.blocks, pipeline_hidden=self._pipeline_hidden(),
                               prefill_chunk=chunk, weight_formats=self.weight_formats)
            try:
                plan.check(*caps, shared=pool)
                break
            except EngineError as e:
                error = e
        else:
            error.plan = plan  # the last attempt's plan, for a report of what did not fit
            raise error
        if self.device.type == "cuda" and opts.gpu_mem_bytes and not opts.dry_run:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, opts.gpu_mem_bytes / total), self.device.index or 0)
        return plan

    def _kept_blocks(self, opts: EngineOptions) -> dict[str, tuple[int, int]]:
        """Weights compressed in the checkpoint's own 4/8-bit blocks, as they are: (bits, group
        size) by key. Empty unless --compress-weight without --requantize-weights on a checkpoint
        that stores such blocks (a GGUF file's Q4_0, Q4_1, Q8_0)."""
        compress = self.policy.compress_weight
        if compress is None or compress.requantize or opts.checkpoint is None:
            return {}
        from .checkpoints import packed_formats
        return packed_formats(opts.checkpoint)

    def _prefill_chunks(self, opts: EngineOptions) -> list[int | None]:
        """Prefill chunk sizes to plan with, in order of preference: the one asked for, else the
        whole prompt, then ever smaller powers of two (multiples of HiP's query block)."""
        hip = self.policy.kv.hip if self.policy.kv.policy == "hip" else None
        if opts.prefill_chunk is not None:
            if opts.prefill_chunk < 1:
                raise EngineError(f"--prefill-chunk must be at least 1 token, got {opts.prefill_chunk}.")
            if hip is not None and opts.prefill_chunk % hip.block_size_q:
                raise EngineError(f"--prefill-chunk {opts.prefill_chunk} is not a multiple of --hip-block-q "
                                  f"{hip.block_size_q} (HiP selects per query block).",
                                  f"Use a multiple of {hip.block_size_q}, e.g. "
                                  f"{max(hip.block_size_q, opts.prefill_chunk // hip.block_size_q * hip.block_size_q)}.")
            return [opts.prefill_chunk]
        sizes: list[int | None] = [None]
        chunk = 1 << max(0, (self.workload.prompt_len - 1).bit_length() - 1)  # a one-token prompt: none
        while chunk >= 64:
            if chunk < self.workload.prompt_len and (hip is None or chunk % hip.block_size_q == 0):
                sizes.append(chunk)
            chunk //= 2
        return sizes

    def _pipeline_hidden(self) -> int:
        """GPU batches' hidden states a pipeline stage holds beyond one engine's: unless it is the
        first stage, a block's received inputs and the next block's posted receive; unless it is the
        last, a block's outputs and the previous block's, still being sent."""
        if not self.pipelined:
            return 0
        nb = self.policy.num_gpu_batches
        return 2 * nb * ((self.stage.layers.start > 0) + (self.stage.layers.stop < self.num_layers))

    def _check_hip_placement(self) -> None:
        """HiP reads a 4/8-bit cache only through its hot-block cache, which dequantizes blocks on
        arrival: the packed cache must live off the GPU and be attended there."""
        policy = self.policy
        if policy.kv.policy != "hip" or policy.compress_cache is None:
            return
        tiers = set(self.plan.kv_tiers.values())
        if Tier.GPU in tiers or (policy.cpu_cache_compute and Tier.CPU in tiers):
            raise EngineError("--kv-policy hip with --compress-cache keeps the KV cache packed in host memory or on "
                              "disk and brings the blocks it selects to the GPU; this placement keeps some of it on "
                              "the GPU or attends it on the CPU.",
                              "Put the whole KV cache off the GPU (3rd --percent value 0) and drop "
                              "--cpu-cache-compute, or drop --compress-cache.")

    def _check_hip_layers(self, model: ModelConfig) -> None:
        hip = self.policy.kv.hip if self.policy.kv.policy == "hip" else None
        if hip is not None and hip.dense_layers > model.num_layers:
            raise EngineError(f"--hip-dense-layers {hip.dense_layers} is more than {model.name}'s "
                              f"{model.num_layers} attention layers.",
                              f"Give at most {model.num_layers} (0 to {model.num_layers}).")

    def _refuse_oversized(self, opts: EngineOptions) -> None:
        """Refuse a model whose weights and KV cache alone exceed the three tiers together, from
        its size arithmetic (no layer list is built: a billion-layer config is refused at once)."""
        weights, cache = size_floor(self.model, self.policy, self.workload, self.dtype)
        gpu, cpu, disk = self._caps(opts)
        pool = self._shared_pool()
        room = (gpu + cpu if pool is None else min(gpu + cpu, pool)) + disk
        if weights + cache > room:
            raise EngineError(
                f"policy does not fit: {self.model.name}'s weights and KV cache alone need "
                f"{format_size(weights + cache)} (weights {format_size(weights)}, KV cache {format_size(cache)}, "
                f"{self.model.num_layers} layers) but the GPU, CPU and disk tiers have {format_size(room)} together "
                "(--gpu-mem, --cpu-mem, --offload-dir).",
                "To fix: check the model's config (num_hidden_layers, hidden_size), compress "
                "(--compress-weight, --compress-cache), shorten the workload, or put more on disk (--percent).")

    def _shared_pool(self) -> int | None:
        """Without a GPU the "GPU" tier is host memory too: both tiers come out of what is available."""
        if self.options.dry_run:  # the caps describe the machine planned for
            return None
        return psutil.virtual_memory().available if self.device.type == "cpu" else None

    def _check_caps(self, opts: EngineOptions) -> None:
        """A cap above what the device has is a mistake, never a promise the plan can keep."""
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            gpu_total, gpu_name = props.total_memory, f"the GPU ({props.name})"
        else:
            gpu_total, gpu_name = psutil.virtual_memory().total, "the CPU (no GPU: host memory)"
        host_total = psutil.virtual_memory().total
        for flag, cap, total, what in (("--gpu-mem", opts.gpu_mem_bytes, gpu_total, gpu_name),
                                       ("--cpu-mem", opts.cpu_mem_bytes, host_total, "host memory")):
            if cap and cap > total:
                raise EngineError(f"{flag} {format_size(cap)} is more than the {format_size(total)} of {what}.",
                                  f"Lower {flag} or drop it.")

    def _caps(self, opts: EngineOptions) -> tuple[int, int, int]:
        """Bytes available on the GPU, CPU and disk tiers."""
        if opts.dry_run:  # the caps as given, else what this machine has in all
            host = psutil.virtual_memory().total
            device = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else host
            disk = disk_capacity(Path(opts.offload_dir)) if self.policy.uses_disk else 0
            return opts.gpu_mem_bytes or device, opts.cpu_mem_bytes or host, disk
        self._check_caps(opts)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            gpu = min(opts.gpu_mem_bytes or total, free + cached)
        else:
            gpu = opts.gpu_mem_bytes or psutil.virtual_memory().available
        cpu = opts.cpu_mem_bytes or psutil.virtual_memory().available
        if self.device.type == "cpu" and opts.gpu_mem_bytes is None and opts.cpu_mem_bytes is None:
            gpu = cpu = cpu // 2  # both tiers share host memory
        disk = disk_capacity(Path(opts.offload_dir)) if self.policy.uses_disk else 0
        return gpu, cpu, disk

    def allocated_bytes(self) -> dict[Tier, int]:
        """Bytes the engine holds per tier (persistent allocations, the disk relay's ring included)."""
        out = {t: s.allocated_bytes for t, s in self.storages.items()}
        if self.mover.relay is not None:
            out[Tier.CPU] += self.mover.relay.ring_bytes + 4096
        if self.weight_host is not self.storages[Tier.CPU]:
            out[Tier.CPU] += self.weight_host.allocated_bytes
        return out

    @property
    def pin_seconds(self) -> float:
        """Start-up seconds spent pinning host memory (faulting pages in and registering them)."""
        hosts = {id(h): h for h in (self.storages[Tier.CPU], self.weight_host)}
        return sum(h.pin_seconds for h in hosts.values())

    def _prepare_inputs(self, input_ids, attention_mask, cfg: GenerationConfig):
        """Check the prompts where they enter; fill a short batch with copies of row 0 (dropped later)."""
        p = self.policy
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point() \
                or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise EngineError("input_ids must be a non-empty 2-D integer tensor (N prompts, s tokens).")
        n, s = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if tuple(attention_mask.shape) != (n, s):
            raise EngineError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(n, s)}.",
                              "Give one mask entry per token.")
        if not bool(attention_mask[:, -1].all()):
            raise EngineError("prompts must be left-padded: the last token of every row must be real.")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.model.vocab_size:
            raise EngineError(f"token ids must be in [0, {self.model.vocab_size}).")
        if n > p.batch_size:
            raise EngineError(f"{n} prompts exceed the batch of {p.batch_size} ({p.gpu_batch_size} x "
                              f"{p.num_gpu_batches}).", "Raise --gpu-batch-size or --num-gpu-batches.")
        if s > self.workload.prompt_len:
            raise EngineError(f"a prompt of {s} tokens would exceed the planned workload ({self.workload.prompt_len} "
                              "prompt tokens).", "Plan longer prompts: Workload(prompt_len, ...) for Engine(...), or "
                              "max_prompt_len of Engine.from_pretrained.")
        if cfg.max_new_tokens > self.workload.gen_len:
            raise EngineError(f"max_new_tokens={cfg.max_new_tokens} exceeds the engine, planned for "
                              f"{self.workload.gen_len} new tokens.", f"Plan more: Workload(..., gen_len="
                              f"{cfg.max_new_tokens}) for Engine(...), or max_new_tokens={cfg.max_new_tokens} of "
                              "Engine.from_pretrained.")
        if n < p.batch_size:
            fill = p.batch_size - n
            input_ids = torch.cat([input_ids, input_ids[:1].expand(fill, s)])
            attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(fill, s)])
        return n, input_ids.long(), attention_mask

    def generate(self, input_ids, attention_mask: torch.Tensor | None = None,
                 config: GenerationConfig | None = None, collect_logits: bool = False,
                 forced: torch.Tensor | None = None, on_step: StepCallback | None = None):
        """Generate for N <= batch size left-padded prompts (N, s).

        `forced` (N, steps) feeds given tokens instead of sampled ones (teacher forcing: how
        perplexity runs token by token); `on_step(step, logits (N, V) on the device, tokens (N,))`
        sees every step as it happens (streaming, scoring). A list of strings instead of token
        ids runs the text path of an engine made by `from_pretrained` (see text.py); a
        GenerationConfig may follow the prompts directly, as `generate(texts, config)`.
        """
        if not self._finalizer.alive:  # close() released the homes and stopped the I/O threads
            raise EngineError("this engine is closed: its memory and offload files were released.",
                              "Build a new Engine, and call generate inside its `with` block.")
        if isinstance(attention_mask, GenerationConfig):
            if config is not None:
                raise EngineError("two GenerationConfigs given.", "Pass one, as config=GenerationConfig(...).")
            attention_mask, config = None, attention_mask
        if isinstance(input_ids, (list, tuple)) and all(isinstance(p, str) for p in input_ids):
            from .text import generate_text
            return generate_text(self, list(input_ids), config, on_step)
        if not isinstance(input_ids, torch.Tensor):
            raise EngineError(f"generate got {type(input_ids).__name__} prompts: a list of strings is text (an engine "
                              "from Engine.from_pretrained), token ids are a 2-D integer tensor (N prompts, s tokens).",
                              "Wrap one text in a list, or pass token ids as torch.tensor([[...]]).")
        cfg = config or GenerationConfig(max_new_tokens=self.workload.gen_len)
        cfg.check_vocab(self.model.vocab_size)
        p = self.policy
        n, input_ids, attention_mask = self._prepare_inputs(input_ids, attention_mask, cfg)
        if forced is not None:
            forced = self._check_forced(forced, n, cfg)
        ids = input_ids.to(self.device).split(p.gpu_batch_size)
        states = [st.reset(m) for st, m in zip(self.states, attention_mask.split(p.gpu_batch_size))]
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed) if cfg.do_sample else None
        finished = torch.zeros(p.batch_size, dtype=torch.bool, device=self.device)
        tokens, step_logits, prompt_logits, splits = [], [], None, []
        self.profiler.collect()
        self._evict_disk_pages(reset=True)  # before the clock starts
        evicted_s = 0.0  # eviction time between steps, left out of the decode time
        t0 = time.perf_counter()
        prefill_s = 0.0
        bar = tqdm(total=n * cfg.max_new_tokens, desc="generate", disable=not self.options.progress, unit="tok")
        try:
            for step in range(cfg.max_new_tokens):
                if step > 0 and self.decode_graph is not None:
                    out = torch.cat(self.decode_graph.step(list(ids)))
                else:
                    out = torch.cat(self.scheduler.step(list(ids), states, all_logits=collect_logits and step == 0))
                if collect_logits and step == 0:
                    prompt_logits = out[:n].cpu()
                logits = out[:, -1]
                if collect_logits:
                    step_logits.append(logits[:n].cpu())
                nxt = sample(logits, cfg, gen) if forced is None else forced[:, step]
                if cfg.stop_token_id is not None:
                    nxt = nxt.masked_fill(finished, self.model.pad_token_id)
                    finished |= nxt == cfg.stop_token_id
                tokens.append(nxt)
                if on_step is not None:
                    on_step(step, logits[:n], nxt[:n])
                bar.update(n)
                ids = nxt[:, None].split(p.gpu_batch_size)
                if step == 0:
                    self._sync()
                    prefill_s = time.perf_counter() - t0
                split = self.profiler.collect()
                if step > 0 and split:
                    splits.append(split)
                if cfg.stop_token_id is not None and bool(finished[:n].all()):
                    break
                if self.options.cold_disk and step + 1 < cfg.max_new_tokens:
                    self._sync()  # the step's reads and writes are done before its pages are dropped (counted)
                    evicted_s += self._evict_disk_pages()
            self._sync()
        finally:  # also when interrupted: what is printed next starts on a line of its own
            bar.close()
        total_s = time.perf_counter() - t0
        avg = mean_split(splits)
        return GenerationResult(torch.stack(tokens, 1)[:n].cpu(), prefill_s, total_s - prefill_s - evicted_s,
                                step_logits, prompt_logits, avg)

    def _evict_disk_pages(self, reset: bool = False) -> float:
        """With `cold_disk`: drop the disk tier from the page cache (between steps, after the
        step's work is done) and return the seconds that took, which the timings leave out."""
        if reset:
            self.cold_disk_resident = []  # fraction of the disk tier still resident after each eviction
        if not self.options.cold_disk or not self.policy.uses_disk:
            return 0.0
        t = time.perf_counter()
        self.cold_disk_resident.append(self.disk.evict_page_cache())
        return time.perf_counter() - t

    def _check_forced(self, forced: torch.Tensor, n: int, cfg: GenerationConfig) -> torch.Tensor:
        if tuple(forced.shape) != (n, cfg.max_new_tokens) or forced.is_floating_point():
            raise EngineError(f"forced tokens must be an integer ({n}, {cfg.max_new_tokens}) tensor, got "
                              f"{tuple(forced.shape)}.")
        if int(forced.min()) < 0 or int(forced.max()) >= self.model.vocab_size:
            raise EngineError(f"forced token ids must be in [0, {self.model.vocab_size}).")
        fill = self.policy.batch_size - n
        forced = torch.cat([forced, forced[:1].expand(fill, -1)]) if fill else forced
        return forced.long().to(self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Stop the I/O threads, delete offload files and unpin host memory; the engine is done."""
        self._finalizer()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _release(mover: Mover, disk: DiskStorage, hosts: tuple[HostStorage, ...],
             capped: torch.device | None) -> None:
    if mover.cuda:  # host functions queued on a stream (CPU attention) may still write host memory
        try:
            torch.cuda.synchronize()
        except RuntimeError:  # a failed device: nothing runs any more, and the files must still go
            pass
    mover.close()
    disk.cleanup()
    for storage in hosts:
        storage.release()
    if capped is not None:  # the --gpu-mem cap is the engine's, not the process's: lift it
        torch.cuda.set_per_process_memory_fraction(1.0, capped.index or 0)
