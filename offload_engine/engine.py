"""The engine: plans memory, places weights, and runs batched generation.

    with Engine(ModelConfig, Policy, Workload(prompt_len, gen_len), EngineOptions(...)) as engine:
        result = engine.generate(input_ids, attention_mask, GenerationConfig(max_new_tokens=32))

An engine holds pinned host memory and offload files until `close()` (or the end of the `with`
block, or garbage collection, or interpreter exit: a finalizer runs `close()` then).
"""
from __future__ import annotations

import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch
from tqdm import tqdm

from offload_engine.policies.memory import MemoryPlan, Workload, plan_memory
from offload_engine.policies.placement import Policy

from .activations import ActivationStore
from .batch import BatchState
from .decode_graph import DecodeGraph, graphs_apply
from .config import ModelConfig
from .errors import EngineError
from .kv import KVCacheStore, make_codec, make_kv_policy
from .models import build_layers
from .profiler import Profiler, mean_split
from .sampling import GenerationConfig, sample
from .schedule import Scheduler
from .io.tiers import DeviceStorage, DiskStorage, HostStorage, Tier, check_writable
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


class Engine:
    def __init__(self, model: ModelConfig, policy: Policy, workload: Workload, options: EngineOptions | None = None,
                 stage: StageSlice | None = None):
        """`stage`: build only these layers, for a pipeline stage (driven through `scheduler.step`)."""
        opts = options or EngineOptions()
        self.model, self.policy, self.workload, self.options = model, policy, workload, opts
        self.device = resolve_device(opts.device)
        self.dtype = opts.dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        if workload.max_len - 1 > model.max_positions:  # the last generated token is never fed back
            raise EngineError(f"prompt + generated length {workload.max_len} exceeds {model.name}'s "
                              f"{model.max_positions} positions.", "Lower --prompt-len or --gen-len.")
        layers = build_layers(model, policy.sep_layer)
        self.pipelined, self.num_layers = stage is not None, len(layers)
        self.stage = stage or StageSlice(range(len(layers)))
        self.attention_offset = sum(layer.kv_spec is not None for layer in layers[:self.stage.layers.start])
        self.all_weight_keys = {s.key for layer in layers for s in layer.weight_specs()}
        self.layers = layers[self.stage.layers.start:self.stage.layers.stop]
        self.plan: MemoryPlan = self._plan(opts)

        self.profiler = Profiler(opts.profile)
        self.disk = DiskStorage(Path(opts.offload_dir))
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
        self.states = [BatchState(policy.gpu_batch_size, workload.max_len, self.device)
                       for _ in range(policy.num_gpu_batches * self.stage.blocks)]
        self.graph_refusal = graphs_apply(policy, self.plan, self.device, opts.profile) \
            if not self.pipelined else "a pipeline stage runs its steps eagerly"
        on_gpu = self.device.type == "cuda"
        self.decode_graph = DecodeGraph(self.scheduler, self.states, self.device, eager=opts.eager_static_decode) \
            if self.graph_refusal is None and (on_gpu or opts.eager_static_decode) else None

    def _plan(self, opts: EngineOptions) -> MemoryPlan:
        """The memory plan, refused before any allocation if it does not fit.

        Streamed weights get a third staging slot when it fits: it lets the next two layers load
        while one computes, which hides the load of a small layer behind a slow one.
        """
        caps = self._caps(opts)
        error = None
        self.relay_settings, relay = None, 0
        if self.policy.uses_disk:  # the disk tier's size does not depend on the ring or the slots
            disk = plan_memory(self.layers, self.policy, self.workload, self.dtype, self.model.hidden_size,
                               kv_blocks=self.stage.blocks, pipeline_hidden=self._pipeline_hidden())
            self.relay_settings = opts.disk_relay.fitted(disk.tiers[Tier.DISK].total)
            relay = self.relay_settings.host_bytes()
        for slots in [self.policy.weight_buffers] if self.policy.weight_buffers else [3, 2]:
            plan = plan_memory(self.layers, self.policy, self.workload, self.dtype, self.model.hidden_size, slots,
                               relay_bytes=relay, kv_blocks=self.stage.blocks, pipeline_hidden=self._pipeline_hidden())
            try:
                plan.check(*caps)
                break
            except EngineError as e:
                error = e
        else:
            raise error
        if self.device.type == "cuda" and opts.gpu_mem_bytes:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, opts.gpu_mem_bytes / total), self.device.index or 0)
        return plan

    def _pipeline_hidden(self) -> int:
        """GPU batches' hidden states a pipeline stage holds beyond one engine's: unless it is the
        first stage, a block's received inputs and the next block's posted receive; unless it is the
        last, a block's outputs and the previous block's, still being sent."""
        if not self.pipelined:
            return 0
        nb = self.policy.num_gpu_batches
        return 2 * nb * ((self.stage.layers.start > 0) + (self.stage.layers.stop < self.num_layers))

    def _caps(self, opts: EngineOptions) -> tuple[int, int, int]:
        """Bytes available on the GPU, CPU and disk tiers."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            gpu = min(opts.gpu_mem_bytes or total, free + cached)
        else:
            gpu = opts.gpu_mem_bytes or psutil.virtual_memory().available
        cpu = opts.cpu_mem_bytes or psutil.virtual_memory().available
        if self.device.type == "cpu" and opts.gpu_mem_bytes is None and opts.cpu_mem_bytes is None:
            gpu = cpu = cpu // 2  # both tiers share host memory
        disk = 0
        if self.policy.uses_disk:
            check_writable(Path(opts.offload_dir))
            disk = shutil.disk_usage(opts.offload_dir).free
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
        if s > self.workload.prompt_len or cfg.max_new_tokens > self.workload.gen_len:
            raise EngineError(f"prompt {s} + {cfg.max_new_tokens} new tokens exceed the planned workload "
                              f"{self.workload.prompt_len} + {self.workload.gen_len}.", "Plan a larger workload.")
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
        ids runs the text path of an engine made by `from_pretrained` (see text.py).
        """
        if isinstance(input_ids, (list, tuple)):
            from .text import generate_text
            return generate_text(self, list(input_ids), config, on_step)
        cfg = config or GenerationConfig(max_new_tokens=self.workload.gen_len)
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
