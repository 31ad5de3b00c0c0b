"""The benchmark cases of `experiments/bench_suite.py`: this engine beside the published FlexGen.

A case is one workload (model, prompt and generated lengths, GPU cap) with each system's flags.
A table of frozen dataclasses, not command lines: one policy reaches both systems spelled as each
parses it, a case's settings are hashed into the key that lets a rerun skip finished runs, and
the table is checked as a whole (`validate`) before any device time is spent.

FlexGen's runs are expensive, so several cases name one FlexGen run as their `peer`: a case
carries FlexGen flags (its own peer) or names a case that does, with the same workload. H2O cases run FlexGen's plain policy: FlexGen
has no H2O. Hugging Face Accelerate (`experiments/accelerate_peer.py`) is a third system; its
runs belong to the case that carries its flags (the `table-` cases, which fill the cells of the
papers' tables that no earlier case covers: `experiments/paper_tables.py`).

Sizes were checked with the engine's planner (`bench_suite.py --dry-run` prints every plan):
OPT-30B's fp16 weights are 56 GiB; the machine has 125 GiB of RAM and a 64 GiB disk. Times
(`est_s`) are first guesses (OPT-30B: about 100 s of start-up before the timed part) until a
run's measured wall time replaces them.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

Batch = tuple[int, int]  # (gpu_batch_size, num_gpu_batches)
ALL_GPU = (100, 0, 100, 0, 100, 0)
OPT30B_CUT_GEN_LEN = 5  # FlexGen's OPT-30B runs decode 5 steps and extrapolate, as the shared baseline did


@dataclass(frozen=True)
class SystemPolicy:
    """Flags both systems share. The batch tried first is (gpu_batch_size, num_gpu_batches);
    `batch_candidates` are tried next, in order, while a batch does not fit (refused by our
    planner, or out of memory), so a case runs the largest batch that fits the machine."""

    percent: tuple[float, ...]
    gpu_batch_size: int
    num_gpu_batches: int = 1
    cpu_cache_compute: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    batch_candidates: tuple[Batch, ...] = ()
    extra: tuple[str, ...] = ()
    est_s: float = 120.0  # guessed wall time of one run (all candidates), until one is measured

    def batches(self) -> tuple[Batch, ...]:
        return ((self.gpu_batch_size, self.num_gpu_batches),) + tuple(self.batch_candidates)

    @property
    def uses_disk(self) -> bool:
        p = self.percent
        return any(p[i] + p[i + 1] < 100 for i in (0, 2, 4))

    def common_flags(self, batch: Batch) -> list[str]:
        flags = ["--percent", *(f"{p:g}" for p in self.percent),
                 "--gpu-batch-size", str(batch[0]), "--num-gpu-batches", str(batch[1])]
        for on, flag in ((self.cpu_cache_compute, "--cpu-cache-compute"),
                         (self.compress_weight, "--compress-weight"), (self.compress_cache, "--compress-cache")):
            if on:
                flags.append(flag)
        return flags


@dataclass(frozen=True)
class Ours(SystemPolicy):
    kv_policy: str = "full"  # full | h2o | sink | hip
    hh_ratio: float | None = None
    recent_ratio: float | None = None
    cuda_graphs: bool | None = None  # None: the engine's default; only for an engine that has the flag
    cut_gen_len: int | None = None  # decode this many steps and extrapolate (a step's cost must not grow)
    # A compressed cache in FlexGen's scheme (per token, groups of 64): the same bytes and work as
    # the peer it is compared with; None: the engine's default (KIVI with full attention).
    cache_codec: str | None = "token"

    def flags(self, batch: Batch) -> list[str]:
        flags = self.common_flags(batch)
        if self.compress_cache and self.cache_codec is not None:
            flags += ["--cache-codec", self.cache_codec] + (["--quant-group-size", "64"] if self.cache_codec == "token"
                                                            else [])
        if self.kv_policy != "full":
            flags += ["--kv-policy", self.kv_policy]
            flags += ["--hh-ratio", f"{self.hh_ratio:g}"] if self.hh_ratio is not None else []
            flags += ["--recent-ratio", f"{self.recent_ratio:g}"] if self.recent_ratio is not None else []
        if self.cuda_graphs is not None:
            flags.append("--cuda-graphs" if self.cuda_graphs else "--no-cuda-graphs")
        if self.cut_gen_len is not None:
            flags += ["--cut-gen-len", str(self.cut_gen_len)]
        return flags + list(self.extra)


@dataclass(frozen=True)
class FlexGen(SystemPolicy):
    cut_gen_len: int | None = None  # None: the suite's default (5 for OPT-30B); 0: decode every step
    overlap: bool = True

    def flags(self, batch: Batch) -> list[str]:
        flags = self.common_flags(batch)
        if not self.overlap:
            flags += ["--overlap", "False"]
        return flags + list(self.extra)


@dataclass(frozen=True)
class Accelerate:
    """Hugging Face transformers + Accelerate offloading (`experiments/accelerate_peer.py`): whole
    decoder layers on the GPU up to `gpu_weights_gib`, then in RAM up to `cpu_gib`, then on disk.
    The KV cache and the activations stay on the GPU, so the GPU cap bounds the batch: batches are
    tried largest first while they run out of memory. The same duck type as SystemPolicy for the
    suite (`batches`, `uses_disk`, `est_s`)."""

    batch_size: int
    gpu_weights_gib: float | None = None  # max_memory of the GPU; None: the case's cap, else the free memory
    cpu_gib: float | None = None  # max_memory of the CPU; None: 85% of the available RAM; set it to reach the disk
    batch_candidates: tuple[int, ...] = ()
    cut_gen_len: int | None = None  # generate this many tokens and extrapolate (FlexGen's projection)
    est_s: float = 120.0

    def batches(self) -> tuple[Batch, ...]:
        return tuple((b, 1) for b in (self.batch_size, *self.batch_candidates))

    @property
    def uses_disk(self) -> bool:  # a CPU budget is only set to push weights to disk
        return self.cpu_gib is not None

    def flags(self, batch: Batch) -> list[str]:
        flags = ["--batch-size", str(batch[0] * batch[1])]
        flags += ["--gpu-weights-gib", f"{self.gpu_weights_gib:g}"] if self.gpu_weights_gib is not None else []
        return flags + (["--cpu-gib", f"{self.cpu_gib:g}"] if self.cpu_gib is not None else [])


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # our name (opt-6.7b); FlexGen gets facebook/<model>
    prompt_len: int
    gen_len: int
    gpu_cap_gib: float | None
    ours: Ours | None
    flexgen: FlexGen | None
    peer: str | None = None  # the case whose FlexGen run this one is compared with (default: itself)
    note: str = ""
    accelerate: Accelerate | None = None

    def peer_name(self) -> str | None:
        return self.peer or (self.name if self.flexgen else None)

    def policy(self, system: str) -> SystemPolicy | Accelerate | None:
        return {"ours": self.ours, "flexgen": self.flexgen, "accelerate": self.accelerate}[system]


H2O = dict(kv_policy="h2o", hh_ratio=0.1, recent_ratio=0.1)  # the paper's 20% budget

_CASES = [
    # --- all on the GPU -------------------------------------------------------------------------
    Case("opt6.7b-gpu-b32", "opt-6.7b", 512, 32, None,
         Ours(ALL_GPU, 32, est_s=20), FlexGen(ALL_GPU, 32, est_s=40),
         note="the README's first headline case"),
    Case("opt6.7b-gpu-bmax", "opt-6.7b", 512, 32, None,
         Ours(ALL_GPU, 256, batch_candidates=((192, 1), (160, 1), (128, 1)), est_s=60), None,
         peer="opt6.7b-gpu-b32",
         note="ours only: the largest batch that fits (planned 92.5 GiB at 256: H200; 72.5 at 192: H100)"),
    # --- OPT-30B on a GPU capped at 16 GiB, KV cache and attention on the CPU --------------------
    Case("opt30b-cap16-cpuattn", "opt-30b", 512, 32, 16,
         Ours((20, 80, 0, 100, 0, 100), 24, 2, cpu_cache_compute=True, est_s=180),
         FlexGen((20, 80, 0, 100, 0, 100), 24, 2, cpu_cache_compute=True, est_s=110),
         note="the README's second headline case"),
    # --- disk -----------------------------------------------------------------------------------
    Case("opt6.7b-disk-weights", "opt-6.7b", 512, 32, None,
         Ours((0, 50, 100, 0, 100, 0), 32, est_s=180), FlexGen((0, 50, 100, 0, 100, 0), 32, est_s=180),
         note="half of the weights (6.2 GiB) read from disk every step, the rest streamed from CPU; "
              "both read through the page cache (ours: pread into a pinned ring; FlexGen: numpy memmaps)"),
    Case("opt6.7b-disk-weights-cold", "opt-6.7b", 512, 32, None,
         Ours((0, 50, 100, 0, 100, 0), 32, extra=("--cold-disk",), cut_gen_len=8, est_s=120), None,
         peer="opt6.7b-disk-weights",
         note="ours only: the disk tier evicted from the page cache before every step, so each step reads "
              "6.2 GiB from the disk itself (FlexGen has no such switch); compare its weight I/O per step "
              "with the bytes over bench_disk_io's cold read rate"),
    Case("opt6.7b-disk-weights-kv", "opt-6.7b", 512, 32, None,
         Ours((0, 50, 0, 50, 100, 0), 32, est_s=260), FlexGen((0, 50, 0, 50, 100, 0), 32, est_s=240),
         note="weights and KV cache half on CPU, half on disk (10.5 GiB on disk)"),
    Case("opt30b-disk", "opt-30b", 512, 32, 16,
         Ours((20, 50, 0, 100, 0, 100), 24, 2, cpu_cache_compute=True, est_s=150),
         FlexGen((20, 50, 0, 100, 0, 100), 24, 2, cpu_cache_compute=True, est_s=200),
         note="30% of the weights (16.9 GiB) on disk, 50% (28 GiB) and the KV cache (33.5 GiB) in RAM; "
              "ours decodes all 32 steps from disk"),
    Case("opt30b-disk-kv", "opt-30b", 512, 32, 16,
         Ours((20, 50, 0, 50, 0, 100), 24, 2, est_s=400),
         FlexGen((20, 50, 0, 50, 0, 100), 24, 2, est_s=300),
         note="30% of the weights and half of the KV cache on disk (33.6 GiB), GPU attention"),
    # --- compression (4-bit, group 64) ------------------------------------------------------------
    Case("opt6.7b-compress-b72", "opt-6.7b", 512, 32, None,
         Ours(ALL_GPU, 72, compress_weight=True, compress_cache=True, est_s=30),
         FlexGen(ALL_GPU, 72, compress_weight=True, compress_cache=True, est_s=50),
         note="FlexGen's published compressed setting for OPT-6.7B"),
    Case("opt6.7b-compress-bmax", "opt-6.7b", 512, 32, None,
         Ours(ALL_GPU, 768, compress_weight=True, compress_cache=True,
              batch_candidates=((640, 1), (512, 1), (384, 1), (256, 1)), est_s=90), None,
         peer="opt6.7b-compress-b72", note="ours only: the largest compressed batch that fits"),
    Case("opt30b-compress-cap16", "opt-30b", 512, 32, 16,
         Ours((0, 100, 0, 100, 0, 100), 64, 4, compress_cache=True, batch_candidates=((64, 3),), est_s=260),
         FlexGen((0, 100, 0, 100, 0, 100), 64, 4, compress_cache=True, batch_candidates=((64, 3),), est_s=220),
         note="FlexGen's compressed OPT-30B policy with 4 GPU batches instead of 8: 64x8 sequences of 544 "
              "4-bit tokens are 100 GiB of KV cache next to 56 GiB of weights (160 GiB planned, the machine "
              "has 125); 64x4 plans 108 GiB"),
    Case("opt30b-compress-both-cap16", "opt-30b", 512, 32, 16,
         Ours((0, 100, 0, 100, 0, 100), 64, 7, compress_weight=True, compress_cache=True,
              batch_candidates=((64, 6), (64, 4)), est_s=280),
         FlexGen((0, 100, 0, 100, 0, 100), 64, 7, compress_weight=True, compress_cache=True,
                 batch_candidates=((64, 6), (64, 4)), est_s=240),
         note="weights 4-bit too (15.7 GiB): 64x7 plans 107 GiB of RAM (64x8 would need 120)"),
    # --- H2O, 20% KV budget, GPU capped at 16 GiB (ours only; FlexGen runs its plain policy) ------
    Case("opt30b-h2o-512+32", "opt-30b", 512, 32, 16,
         Ours((10, 90, 0, 100, 0, 100), 64, 6, cpu_cache_compute=True, **H2O,
              batch_candidates=((48, 6), (48, 4), (32, 4), (24, 2)), est_s=260), None,
         peer="opt30b-cap16-cpuattn",
         note="H2O keeps 103 of 544 tokens: large batches fit in RAM; 10% of the weights on the GPU "
              "leaves room for the working memory of a 64-sequence GPU batch"),
    Case("opt30b-h2o4bit-512+32", "opt-30b", 512, 32, 16,
         Ours((10, 90, 0, 100, 0, 100), 64, 10, cpu_cache_compute=True, compress_cache=True, **H2O,
              batch_candidates=((64, 8), (64, 6)), est_s=280),
         FlexGen((0, 100, 0, 100, 0, 100), 64, 7, compress_weight=True, compress_cache=True,
                 batch_candidates=((64, 6), (64, 4)), est_s=240),
         note="H2O with a 4-bit cache (one C++ job per item over the records and the exact newest tokens): "
              "the batch the smaller cache allows, against opt30b-h2o-512+32 uncompressed and FlexGen's "
              "compressed policy"),
    Case("opt30b-h2o-512+512", "opt-30b", 512, 512, 16,
         Ours((10, 90, 0, 100, 0, 100), 64, 6, cpu_cache_compute=True, **H2O, cut_gen_len=16,
              batch_candidates=((48, 6), (48, 4), (32, 4)), est_s=300),
         FlexGen((20, 80, 0, 100, 0, 100), 20, 2, cpu_cache_compute=True, batch_candidates=((16, 2),), est_s=150),
         note="511 decode steps of at least 1 s (50 GiB of weights over PCIe each) exceed one 10-minute call: "
              "both systems decode a few steps and extrapolate (an H2O cache stays at its budget, so ours is "
              "exact; FlexGen's attention cost grows with the length, so its extrapolation flatters it)"),
    Case("opt30b-h2o-1024+1024", "opt-30b", 1024, 1024, 16,
         Ours((10, 90, 0, 100, 0, 100), 32, 6, cpu_cache_compute=True, **H2O, cut_gen_len=16,
              batch_candidates=((32, 4), (24, 4), (16, 4)), est_s=300),
         FlexGen((20, 80, 0, 100, 0, 100), 8, 2, cpu_cache_compute=True, batch_candidates=((6, 2),), est_s=200),
         note="1023 decode steps: about 20-25 minutes; only a detached run with a 30-minute machine fits it"),
    Case("opt6.7b-h2o-512+32", "opt-6.7b", 512, 32, 16,
         Ours(ALL_GPU, 48, **H2O, batch_candidates=((40, 1), (32, 1), (24, 1), (16, 1)), est_s=40),
         FlexGen(ALL_GPU, 12, batch_candidates=((8, 1), (4, 1)), est_s=60),
         note="12.4 GiB of weights leave about 3 GiB under the cap: the full cache (272 MiB a sequence) fits "
              "a handful of sequences, H2O's (52 MiB) several times more"),
    Case("opt6.7b-h2o-512+512", "opt-6.7b", 512, 512, 16,
         Ours(ALL_GPU, 48, **H2O, batch_candidates=((40, 1), (32, 1), (24, 1), (16, 1)), est_s=60),
         FlexGen(ALL_GPU, 6, batch_candidates=((4, 1), (2, 1)), est_s=80)),
    Case("opt6.7b-h2o-1024+1024", "opt-6.7b", 1024, 1024, 16,
         Ours(ALL_GPU, 24, **H2O, batch_candidates=((16, 1), (12, 1), (8, 1)), est_s=90),
         FlexGen(ALL_GPU, 3, batch_candidates=((2, 1), (1, 1)), est_s=120)),
]
_KV_ON_CPU = (100, 0, 0, 100, 100, 0)
HIP = dict(kv_policy="hip")
_CASES += [
    # HiP at OPT's 2,048-token limit: the same placement (KV cache in pinned CPU memory, attention on
    # the CPU beside it) with full attention and with HiP, which reads the top-k blocks only.
    Case("opt6.7b-2048-full", "opt-6.7b", 1984, 64, 16,
         Ours(_KV_ON_CPU, 16, cpu_cache_compute=True, est_s=90),
         FlexGen(_KV_ON_CPU, 16, cpu_cache_compute=True, cut_gen_len=8, est_s=150)),
    Case("opt6.7b-2048-hip", "opt-6.7b", 1984, 64, 16,
         Ours(_KV_ON_CPU, 16, cpu_cache_compute=True, **HIP, est_s=90), None, peer="opt6.7b-2048-full"),
    # Long context on a Llama-architecture model (dummy weights): KV cache on the CPU; full attention
    # runs there, HiP keeps block-start keys and a hot-block cache on the GPU.
    Case("llama3.1-8b-32k-full", "llama-3.1-8b", 32000, 32, None,
         Ours(_KV_ON_CPU, 1, cpu_cache_compute=True, est_s=90), None),
    Case("llama3.1-8b-32k-hip", "llama-3.1-8b", 32000, 32, None, Ours(_KV_ON_CPU, 1, **HIP, est_s=90), None),
    Case("llama3.1-8b-128k-full", "llama-3.1-8b", 128000, 32, None,
         Ours(_KV_ON_CPU, 1, cpu_cache_compute=True, est_s=150), None,
         note="16.8 GiB of KV cache read by CPU attention every step"),
    Case("llama3.1-8b-128k-hip", "llama-3.1-8b", 128000, 32, None, Ours(_KV_ON_CPU, 1, **HIP, est_s=150), None),
    # Long context at batch (ShadowKV's protocol): full attention with its cache on the GPU at the
    # largest batch that fits, against HiP with a 4-bit cache in host memory at the largest batch
    # the host and the GPU's block-start keys allow; and a million tokens on one GPU.
    Case("llama3.1-8b-128k-full-gpu-bmax", "llama-3.1-8b", 128000, 32, None,
         Ours(ALL_GPU, 4, batch_candidates=((3, 1), (2, 1), (1, 1)), est_s=240), None),
    Case("llama3.1-8b-128k-hip4-bmax", "llama-3.1-8b", 128000, 32, None,
         Ours(_KV_ON_CPU, 12, compress_cache=True, batch_candidates=((10, 1), (8, 1), (6, 1), (4, 1)), **HIP,
              est_s=400), None),
    Case("llama3.1-8b-1m-hip4", "llama-3.1-8b", 1_000_000, 16, None,
         Ours(_KV_ON_CPU, 1, compress_cache=True, extra=("--max-positions", "1048576"), **HIP, est_s=500), None),
    # OPT-30B at its 2,048-token limit under the 16 GiB cap: FlexGen's OPT-30B placement, the cache
    # (2.7 GiB a sequence) attended on the CPU, fully or through HiP's top-k blocks.
    Case("opt30b-2048-full", "opt-30b", 1984, 64, 16,
         Ours((20, 80, 0, 100, 0, 100), 8, 2, cpu_cache_compute=True, cut_gen_len=16, est_s=200),
         FlexGen((20, 80, 0, 100, 0, 100), 8, 2, cpu_cache_compute=True, batch_candidates=((4, 2),), est_s=200),
         note="both decode a few steps and extrapolate; 1984 + 64 keeps the full cache's growth to 3%"),
    Case("opt30b-2048-hip", "opt-30b", 1984, 64, 16,
         Ours((20, 80, 0, 100, 0, 100), 8, 2, cpu_cache_compute=True, cut_gen_len=16, **HIP, est_s=200), None,
         peer="opt30b-2048-full"),
]
# --- the cells of the papers' throughput tables (experiments/paper_tables.py) no case above fills --
HIP_512 = dict(kv_policy="hip", extra=("--hip-k", "128"))  # the default k (512) covers a 512-token prompt: dense
_CPU_ATTN_30B = dict(percent=(20, 80, 0, 100, 0, 100), cpu_cache_compute=True)  # FlexGen's OPT-30B placement
_CASES += [
    # FlexGen's table, OPT-6.7B all on the GPU, 512+32: FlexGen at its largest batch (the paper reports
    # each system at its best), HiP, Accelerate.
    Case("table-opt6.7b-gpu-flexgen-bmax", "opt-6.7b", 512, 32, None, None,
         FlexGen(ALL_GPU, 256, batch_candidates=((192, 1), (128, 1), (64, 1)), est_s=200),
         note="FlexGen allocates 272 MiB of KV a sequence: 256 fits the H200 only, 192 or less the H100"),
    Case("table-opt6.7b-compress-flexgen-bmax", "opt-6.7b", 512, 32, None, None,
         FlexGen(ALL_GPU, 512, compress_weight=True, compress_cache=True,
                 batch_candidates=((384, 1), (256, 1), (144, 1)), est_s=200),
         note="FlexGen's 4-bit weights and cache at the largest batch that fits (its published setting: 72)"),
    Case("table-opt6.7b-gpu-hip", "opt-6.7b", 512, 32, None,
         Ours(ALL_GPU, 256, **HIP_512, batch_candidates=((192, 1), (128, 1), (64, 1), (32, 1)), est_s=90), None,
         peer="opt6.7b-gpu-b32",
         note="HiP with k = 128 (and its 128-token window, 4 sink tokens) of the 512-token prompt"),
    Case("table-opt6.7b-gpu", "opt-6.7b", 512, 32, None, None, None, peer="opt6.7b-gpu-b32",
         accelerate=Accelerate(256, batch_candidates=(128, 64, 32), est_s=150),
         note="Accelerate with every weight on the GPU: plain transformers generate"),
    # FlexGen's table, OPT-30B on a GPU capped at 16 GiB, 512+32: HiP and Accelerate (also H2O's table).
    Case("table-opt30b-cap16-hip", "opt-30b", 512, 32, 16,
         Ours(gpu_batch_size=24, num_gpu_batches=2, **_CPU_ATTN_30B, **HIP_512, est_s=240), None,
         peer="opt30b-cap16-cpuattn"),
    Case("table-opt30b-cap16-512+32", "opt-30b", 512, 32, 16, None, None, peer="opt30b-cap16-cpuattn",
         accelerate=Accelerate(16, gpu_weights_gib=4, batch_candidates=(12, 8), cut_gen_len=5, est_s=250),
         note="Accelerate's KV cache stays on the GPU: fewer GPU weights (4 GiB, the baseline had 10 at batch 8) "
              "leave room for a larger batch; each step copies the other 52 GiB from pageable RAM (about 6-7 s)"),
    # H2O's table, GPU capped at 16 GiB: this engine with the full cache (FlexGen's placement) and Accelerate.
    Case("table-opt6.7b-cap16-512+32", "opt-6.7b", 512, 32, 16,
         Ours(ALL_GPU, 12, batch_candidates=((10, 1), (8, 1), (6, 1), (4, 1)), est_s=40), None,
         peer="opt6.7b-h2o-512+32", accelerate=Accelerate(8, batch_candidates=(6, 4, 2), est_s=100)),
    Case("table-opt6.7b-cap16-512+512", "opt-6.7b", 512, 512, 16,
         Ours(ALL_GPU, 6, batch_candidates=((5, 1), (4, 1), (3, 1), (2, 1)), est_s=60), None,
         peer="opt6.7b-h2o-512+512", accelerate=Accelerate(4, batch_candidates=(3, 2, 1), est_s=120)),
    Case("table-opt6.7b-cap16-1024+1024", "opt-6.7b", 1024, 1024, 16,
         Ours(ALL_GPU, 3, batch_candidates=((2, 1), (1, 1)), est_s=90), None,
         peer="opt6.7b-h2o-1024+1024", accelerate=Accelerate(2, batch_candidates=(1,), est_s=150)),
    Case("table-opt30b-cap16-512+512", "opt-30b", 512, 512, 16,
         Ours(gpu_batch_size=24, num_gpu_batches=2, **_CPU_ATTN_30B, cut_gen_len=16,
              batch_candidates=((20, 2), (16, 2)), est_s=300), None,
         peer="opt30b-h2o-512+512",
         accelerate=Accelerate(8, gpu_weights_gib=4, batch_candidates=(6, 4), cut_gen_len=5, est_s=250),
         note="both decode a few steps and extrapolate, as FlexGen does: the full cache's attention grows with "
              "the length, so the extrapolation flatters all three"),
    Case("table-opt30b-cap16-1024+1024", "opt-30b", 1024, 1024, 16,
         Ours(gpu_batch_size=12, num_gpu_batches=2, **_CPU_ATTN_30B, cut_gen_len=16,
              batch_candidates=((10, 2), (8, 2), (6, 2)), est_s=300), None,
         peer="opt30b-h2o-1024+1024",
         accelerate=Accelerate(4, gpu_weights_gib=4, batch_candidates=(3, 2), cut_gen_len=5, est_s=250)),
]
CASES: dict[str, Case] = {c.name: c for c in _CASES}

# `bench_suite.py --smoke`: this engine alone, end to end through the real runner on any machine
# (FlexGen needs CUDA). The disk case's first batch exceeds its 1 GiB cap: it must fall back.
SMOKE_CASES: dict[str, Case] = {c.name: c for c in [
    Case("smoke-opt125m", "opt-125m", 32, 4, None, Ours(ALL_GPU, 4, est_s=60), None),
    Case("smoke-opt125m-disk", "opt-125m", 32, 4, 1,
         Ours((0, 50, 100, 0, 100, 0), 512, batch_candidates=((4, 1),), est_s=60), None),
]}


def validate(cases: dict[str, Case]) -> None:
    """Check the table as a whole; one sentence per problem, raised as ValueError."""
    for name, case in cases.items():
        if name != case.name:
            raise ValueError(f"case key '{name}' differs from its name '{case.name}': use the name as the key.")
        if case.ours is None and case.flexgen is None and case.accelerate is None:
            raise ValueError(f"case {name} has no system's flags (ours, flexgen, accelerate): give it at least one.")
        peer = case.peer_name()
        if peer is not None:
            other = cases.get(peer)
            if other is None or other.flexgen is None:
                raise ValueError(f"case {name} names peer '{peer}', which is not a case with FlexGen flags: "
                                 "name one that has them.")
            if (other.model, other.prompt_len, other.gen_len, other.gpu_cap_gib) != \
                    (case.model, case.prompt_len, case.gen_len, case.gpu_cap_gib):
                raise ValueError(f"case {name} and its peer {peer} differ in model, lengths or GPU cap: "
                                 "a peer must run the same workload.")
        for system in ("ours", "flexgen"):
            policy = case.policy(system)
            if policy is not None:
                _validate_policy(name, system, policy)
        if case.accelerate is not None:
            _validate_accelerate(case)


def _validate_accelerate(case: Case) -> None:
    where, a = f"case {case.name} (accelerate)", case.accelerate
    sizes = [b for b, _ in a.batches()]
    if min(sizes) < 1 or sizes != sorted(sizes, reverse=True):
        raise ValueError(f"{where}: batches {sizes} must be positive and in descending order: "
                         "reorder batch_candidates.")
    if a.gpu_weights_gib is not None and not 0 < a.gpu_weights_gib <= (case.gpu_cap_gib or float("inf")):
        raise ValueError(f"{where}: gpu_weights_gib {a.gpu_weights_gib:g} must be positive and within the GPU cap "
                         f"{case.gpu_cap_gib}: lower it.")
    if a.cut_gen_len is not None and not 2 <= a.cut_gen_len < case.gen_len:
        raise ValueError(f"{where}: cut_gen_len {a.cut_gen_len} must be at least 2 and below gen_len {case.gen_len}: "
                         "change it or leave it out.")


def _validate_policy(name: str, system: str, p: SystemPolicy) -> None:
    where = f"case {name} ({system})"
    if len(p.percent) != 6:
        raise ValueError(f"{where}: percent has {len(p.percent)} numbers: give 6.")
    for i in (0, 2, 4):
        if min(p.percent[i], p.percent[i + 1]) < 0 or p.percent[i] + p.percent[i + 1] > 100:
            raise ValueError(f"{where}: percent pair {p.percent[i]:g} + {p.percent[i + 1]:g} is outside 0..100: "
                             "lower one of them.")
    sizes = [b * k for b, k in p.batches()]
    if any(b < 1 or k < 1 for b, k in p.batches()) or sizes != sorted(sizes, reverse=True):
        raise ValueError(f"{where}: batches {p.batches()} must be positive and in descending order of "
                         "gpu_batch_size x num_gpu_batches: reorder batch_candidates.")
    if system == "flexgen":
        if any(float(x) != int(x) for x in p.percent):
            raise ValueError(f"{where}: FlexGen takes whole percentages only: round {p.percent}.")
        if 100 not in p.percent[4:6] and p.percent[4] + p.percent[5] != 0:
            raise ValueError(f"{where}: FlexGen keeps activations 100% on one tier: use 100 0, 0 100 or 0 0.")
        if p.compress_cache and not (100 in p.percent[2:4] or p.percent[2] + p.percent[3] == 0):
            raise ValueError(f"{where}: FlexGen's compressed cache cannot be split across tiers: put it "
                             "100% on one tier.")


def select(patterns: list[str], cases: dict[str, Case] | None = None) -> list[str]:
    """Case names matching the patterns (exact names or shell globs such as 'opt30b-*'), in table order."""
    cases = CASES if cases is None else cases
    chosen: list[str] = []
    for pattern in patterns:
        hits = [n for n in cases if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"no case matches '{pattern}': see --list for the names.")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in cases if n in chosen]


validate(CASES)
validate(SMOKE_CASES)
