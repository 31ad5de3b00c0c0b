"""One pipeline stage: its slice of the layers as an engine with its own placement, driven one
micro-batch at a time.

The batch is cut into `blocks` micro-batches, each a full zig-zag block (gpu_batch_size x
num_gpu_batches sequences), so while stage 1 runs block 0, stage 0 already runs block 1. Per
step and block a stage takes its input (token ids on the first stage: the prompts, then the
tokens the last stage sampled; hidden states elsewhere), runs the single-GPU schedule over its
layers, and passes the result on. The receive of the next input is posted before the current
block computes, so transfers overlap compute. With as many blocks as stages every stage is busy
in decode, the returning tokens included.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import psutil
import torch
import torch.distributed as dist
from tqdm import tqdm

from offload_engine.policies.memory import GiB, Workload
from offload_engine.policies.placement import Policy

from ..config import ModelConfig
from ..engine import Engine, EngineOptions, StageSlice
from ..errors import EngineError
from ..io.tiers import Tier
from ..metrics import peak_memory
from ..profiler import mean_split
from ..sampling import GenerationConfig, sample
from .affinity import compact_cpulist, gpu_local_cpus, online_cpus, physical_core, stage_cores
from .link import StageLink

StepHook = Callable[[int, int], None]  # (stage, step): runs on every stage before each step


@dataclass
class PipelineJob:
    """Everything a stage process needs (pickled to each one)."""

    model: ModelConfig
    policies: list[Policy]  # one per stage: the same batch, each its own placement
    splits: list[range]  # layer ranges of the stages
    blocks: int  # micro-batches in flight
    workload: Workload
    options: EngineOptions  # shared; each stage offloads to <offload_dir>/stage<k>
    prompts: torch.Tensor  # (blocks x batch, s) token ids
    attention_mask: torch.Tensor | None = None  # left padding, as Engine.generate takes it
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    warmup: bool = True  # one short untimed pass first
    collect_logits: bool = False  # return each step's logits (N, V) from the last stage
    on_step: StepHook | None = None
    stage_affinity: bool = True  # each GPU stage's threads on its GPU's NUMA node (affinity.py)

    def __post_init__(self) -> None:
        n, batch = self.prompts.shape[0], self.policies[0].batch_size * self.blocks
        if self.prompts.dim() != 2 or n != batch:
            raise EngineError(f"a pipeline of {self.blocks} micro-batches of {self.policies[0].batch_size} needs "
                              f"{batch} prompts, got {n}.", "Give one prompt per sequence of the batch.")
        if any(p.batch_size != self.policies[0].batch_size for p in self.policies):
            raise EngineError("every stage must run the same gpu-batch-size and num-gpu-batches.")
        if self.attention_mask is not None and not bool(self.attention_mask[:, -1].all()):
            raise EngineError("prompts must be left-padded: the last token of every row must be real.")
        if self.options.device not in (None, "cpu", "cuda"):
            raise EngineError(f"--device {self.options.device}: a pipeline puts each stage on its own GPU "
                              "(the process's local rank).", "Use --device cuda or cpu.")

    @property
    def stages(self) -> int:
        return len(self.splits)

    @property
    def batch_size(self) -> int:
        return self.policies[0].batch_size * self.blocks

    def describe(self, stage: int) -> str:
        r = self.splits[stage]
        return f"stage {stage} of {self.stages} (layers {r.start}-{r.stop - 1})"


def stage_options(job: PipelineJob, stage: int, local_world: int, device: str) -> EngineOptions:
    """A stage's engine options: its own offload folder, and its share of host memory when the
    caps are not given (the stages of one host share it)."""
    opts = replace(job.options, device=device, offload_dir=Path(job.options.offload_dir) / f"stage{stage}")
    available = psutil.virtual_memory().available // local_world
    if device == "cpu" and opts.gpu_mem_bytes is None and opts.cpu_mem_bytes is None:
        return replace(opts, gpu_mem_bytes=available // 2, cpu_mem_bytes=available // 2)
    return replace(opts, cpu_mem_bytes=opts.cpu_mem_bytes or available)


def stage_device(job: PipelineJob, local_rank: int, local_world: int) -> str:
    wanted = job.options.device
    if wanted == "cpu" or (wanted is None and not torch.cuda.is_available()):
        return "cpu"
    if torch.cuda.device_count() < local_world:
        raise EngineError(f"{local_world} stages on this host but {torch.cuda.device_count()} GPU(s) visible.",
                          "Use one stage per GPU (--pipeline), or --device cpu.")
    return f"cuda:{local_rank}"


def run_stage(job: PipelineJob) -> dict | None:
    """The body of one stage process (rank = stage); rank 0 returns the pipeline's result."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world != job.stages:
        raise EngineError(f"{world} processes were started for {job.stages} pipeline stages.",
                          "Start as many processes as --pipeline stages.")
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))  # this host's cores, shared
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where a stage is stuck
    try:
        device = stage_device(job, local_rank, local_world)
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(device)
            if job.stage_affinity:  # before any host memory is touched: its pages land on this node
                allowed, local = set(os.sched_getaffinity(0)), [gpu_local_cpus(i) for i in range(local_world)]
                cores = stage_cores(local_rank, allowed, local, online_cpus(), physical_core(allowed))
                os.sched_setaffinity(0, cores)
                torch.set_num_threads(len(cores))
        dist.init_process_group("gloo")  # every message goes through host memory: see link.py
        link = StageLink(rank, world, torch.device(device), one_host=local_world == world)
        slice_ = StageSlice(job.splits[rank], job.blocks)
        opts = stage_options(job, rank, local_world, device)
        started = time.perf_counter()
        with Engine(job.model, job.policies[rank], job.workload, opts, stage=slice_) as engine:
            startup = {"total": time.perf_counter() - started, "pinning": engine.pin_seconds}
            runner = StageRunner(job, rank, engine, link)
            if job.warmup:
                s = min(32, job.prompts.shape[1])
                runner.generate(job.prompts[:, -s:], None, GenerationConfig(max_new_tokens=1), warm=True)
            report = runner.generate(job.prompts, job.attention_mask, job.generation)
            report["startup_s"] = startup
            reports = [None] * world if rank == 0 else None
            dist.gather_object(report, reports, dst=0, group=link.control)
        dist.destroy_process_group()
    except EngineError as e:
        raise type(e)(f"{job.describe(rank)}: {e.problem}", e.fix) from None
    return assemble(job, reports) if rank == 0 else None


class StageRunner:
    def __init__(self, job: PipelineJob, rank: int, engine: Engine, link: StageLink):
        self.job, self.rank, self.engine, self.link = job, rank, engine, link
        self.policy = job.policies[rank]

    def generate(self, prompts: torch.Tensor, mask: torch.Tensor | None, cfg: GenerationConfig,
                 warm: bool = False) -> dict:
        job, eng, link, p = self.job, self.engine, self.link, self.policy
        b, nb, blocks = p.gpu_batch_size, p.num_gpu_batches, job.blocks
        per_block, steps, s = b * nb, cfg.max_new_tokens, prompts.shape[1]
        mask = torch.ones_like(prompts) if mask is None else mask
        for state, rows in zip(eng.states, mask.split(b)):
            state.reset(rows)
        ids = prompts.to(eng.device).split(per_block)
        gen = torch.Generator(device=eng.device).manual_seed(cfg.seed) if cfg.do_sample else None
        finished = torch.zeros(prompts.shape[0], dtype=torch.bool, device=eng.device)
        tokens = [[None] * blocks for _ in range(steps)]
        logits_out = [[None] * blocks for _ in range(steps)] if job.collect_logits and not warm else None
        pending = {}

        def post(step: int, i: int) -> None:
            if step >= steps:
                return
            if not link.first:
                shape = (b, s if step == 0 else 1, job.model.hidden_size)
                pending[step, i] = link.recv_hidden([shape] * nb, eng.dtype)
            elif step > 0:
                pending[step, i] = link.recv_tokens(per_block)

        link.stats = link.new_stats()
        eng.profiler.collect()
        splits = []
        link.barrier()  # every stage starts its clock together
        post(0, 0)
        t0 = time.perf_counter()
        prefill_s = 0.0
        bar = tqdm(total=prompts.shape[0] * steps, desc="generate", unit="tok",
                   disable=warm or not (link.last and job.options.progress))
        for step in range(steps):
            if job.on_step is not None and not warm:
                job.on_step(self.rank, step)
            for i in range(blocks):
                post(*((step, i + 1) if i + 1 < blocks else (step + 1, 0)))  # the next input, before computing
                if link.first:
                    x = ids[i] if step == 0 else pending.pop((step, i)).wait()[0][:, None]
                    inputs = list(x.split(b))
                else:
                    inputs = pending.pop((step, i)).wait()
                out = eng.scheduler.step(inputs, eng.states[i * nb:(i + 1) * nb],
                                         batch_ids=list(range(i * nb, (i + 1) * nb)))
                if link.last:
                    nxt = self._sample(torch.cat(out)[:, -1], cfg, gen, finished[i * per_block:(i + 1) * per_block],
                                       step, i, logits_out)
                    tokens[step][i] = nxt
                    bar.update(per_block)
                    if step + 1 < steps:
                        link.send_tokens(nxt)
                else:
                    link.send_hidden(out)
                link.flush(keep=1)  # one earlier block's outputs in flight at most: what the plan counts
            if step == 0:
                self._sync()
                prefill_s = time.perf_counter() - t0
            split = eng.profiler.collect()
            if step > 0 and split:
                splits.append(split)
        link.flush()
        self._sync()
        bar.close()
        wall = time.perf_counter() - t0
        busy = mean_split(splits)
        st = link.stats
        report = {"stage": self.rank, "layers": [job.splits[self.rank].start, job.splits[self.rank].stop],
                  "first_layer": eng.layers[0].name, "last_layer": eng.layers[-1].name, "device": str(eng.device),
                  "percent": list(p.percent), "dtype": str(eng.dtype).replace("torch.", ""),
                  "itemsize": eng.dtype.itemsize, "model_gib": eng.plan.model_bytes / GiB,
                  "cache_gib": eng.plan.cache_bytes / GiB,
                  "planned_gib": {t.value: eng.plan.tiers[t].total / GiB for t in Tier},
                  "prefill_s": prefill_s, "decode_s": wall - prefill_s, "wall_s": wall,
                  "wait_input_s": st.wait_input_s, "bubble_s": st.bubble_s, "transfer_s": st.transfer_s,
                  "wait_send_s": st.wait_send_s,
                  "busy_s": wall - st.wait_input_s - st.wait_send_s,
                  "sent_bytes": st.sent_bytes, "received_bytes": st.received_bytes,
                  "decode_step_busy_s": busy, "peak_memory": peak_memory(),
                  "cores": compact_cpulist(os.sched_getaffinity(0)), "threads": torch.get_num_threads()}
        if link.last:
            report["tokens"] = torch.cat([torch.stack([tokens[t][i] for t in range(steps)], 1)
                                          for i in range(blocks)]).cpu()
            if logits_out is not None:
                report["step_logits"] = [torch.cat(row).cpu() for row in logits_out]
        return report

    def _sample(self, logits: torch.Tensor, cfg: GenerationConfig, gen, finished: torch.Tensor, step: int,
                block: int, logits_out) -> torch.Tensor:
        if logits_out is not None:
            logits_out[step][block] = logits
        nxt = sample(logits, cfg, gen)
        if cfg.stop_token_id is not None:  # a finished row keeps padding; the batch runs to the end
            nxt = nxt.masked_fill(finished, self.job.model.pad_token_id)
            finished |= nxt == cfg.stop_token_id
        return nxt

    def _sync(self) -> None:
        """This stage's compute (its stream: the copy threads' transfers are not its time)."""
        if self.engine.device.type == "cuda":
            torch.cuda.current_stream(self.engine.device).synchronize()


def assemble(job: PipelineJob, reports: list[dict]) -> dict:
    """The pipeline's result from the stages' reports: the last stage's clock is the pipeline's
    (every stage starts after one barrier; the last stage finishes each step last)."""
    last = reports[-1]
    return {"tokens": last.pop("tokens"), "step_logits": last.pop("step_logits", None),
            "prefill_s": last["prefill_s"], "decode_s": last["decode_s"], "stages": reports}
