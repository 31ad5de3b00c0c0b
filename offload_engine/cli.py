"""Command line: `offload-engine run ...` (also `python -m offload_engine run ...`)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from policies.memory import Workload
from policies.placement import Policy

from .config import OPT_CONFIGS, resolve_model
from .errors import EngineError
from .metrics import check_output_file
from .sampling import GenerationConfig

GiB = 1 << 30

DESCRIPTION = """\
Throughput-oriented batch generation with OPT models whose weights, KV cache and
activations are spread over GPU, pinned CPU memory and disk.

The policy (--percent and the batch flags) says where everything lives; the engine checks
that it fits before allocating anything, then runs FlexGen's zig-zag block schedule: each
layer's weights are loaded once for a block of --num-gpu-batches batches while the next
layer's weights and the next batch's cache are prefetched.
Throughput = generated tokens / (prefill time + decode time).
"""

EXAMPLES = """\
examples:
  offload-engine run                                  # small model, dummy weights, any machine
  offload-engine run --model opt-6.7b --prompt-len 512 --gen-len 32 --gpu-batch-size 32
  offload-engine run --model opt-30b --percent 20 80 0 100 0 100 --gpu-batch-size 24 \\
      --num-gpu-batches 2 --cpu-cache-compute --gpu-mem 16 --json results.json
  offload-engine run --model ./my-opt-checkpoint --gen-len 16     # real weights from a folder
"""


def _percent_help() -> str:
    return ("six numbers: weights, KV cache and activations, each as %% on GPU then %% on CPU; "
            "the rest of each goes to disk (default: all on GPU: 100 0 100 0 100 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offload-engine", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    run = sub.add_parser("run", help="generate for a batch of prompts and report throughput",
                         description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = run.add_argument_group("model and workload")
    m.add_argument("--model", default="opt-125m",
                   help=f"a name ({', '.join(OPT_CONFIGS)}) for dummy weights, or a Hugging Face checkpoint folder "
                        "(default: opt-125m)")
    m.add_argument("--dummy", action="store_true",
                   help="random weights of the exact architecture even for a checkpoint folder (names always use them)")
    m.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default: 32)")
    m.add_argument("--gen-len", type=int, default=8, help="tokens to generate per sequence (default: 8)")
    m.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight and activation type (default: float16 on a GPU, float32 on the CPU)")
    m.add_argument("--seed", type=int, default=0, help="seed for dummy weights, prompts and sampling")

    p = run.add_argument_group("placement policy")
    p.add_argument("--percent", nargs=6, type=float, default=[100, 0, 100, 0, 100, 0], metavar="P", help=_percent_help())
    p.add_argument("--gpu-batch-size", type=int, default=4, help="sequences per GPU batch (default: 4)")
    p.add_argument("--num-gpu-batches", type=int, default=1,
                   help="GPU batches per block; they share one load of each layer's weights, so the effective "
                        "batch is gpu-batch-size x num-gpu-batches (default: 1)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap weight/KV/activation I/O with compute on separate streams and threads (default: on)")
    p.add_argument("--cpu-cache-compute", action="store_true",
                   help="run decode attention on the CPU for CPU-resident KV cache: only the new token's q/k/v cross "
                        "PCIe instead of the whole cache")
    p.add_argument("--sep-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule attention and MLP as separate layers: smaller weight staging buffers (default: on)")
    p.add_argument("--pin-weight", action=argparse.BooleanOptionalAction, default=True,
                   help="keep CPU weights in pinned memory for fast asynchronous copies (default: on)")
    p.add_argument("--weight-buffers", type=int, default=0,
                   help="GPU staging slots for streamed weights: 2 double-buffers, 3 loads two layers ahead "
                        "(default 0: 3 if they fit, else 2)")

    r = run.add_argument_group("resources")
    r.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                   help="cap on GPU memory, enforced (default: what the GPU has free)")
    r.add_argument("--cpu-mem", type=float, default=None, metavar="GiB",
                   help="cap on host memory (default: what the machine has available)")
    r.add_argument("--offload-dir", type=Path, default=Path("offload_dir"),
                   help="folder for disk-tier tensors, one file each (default: ./offload_dir)")
    r.add_argument("--device", default=None, help="compute device (default: cuda if present, else cpu)")

    g = run.add_argument_group("generation")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability reaches top-p (default: 1.0)")
    g.add_argument("--stop-token", type=int, default=None, help="token id that ends a sequence")

    o = run.add_argument_group("output")
    o.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="write the results (throughput, memory, policy, hardware, commit) as JSON")
    o.add_argument("--profile", action="store_true",
                   help="measure busy time per category (weight I/O, KV I/O, compute) per decode step")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def policy_from_args(args: argparse.Namespace) -> Policy:
    return Policy.from_percent(
        args.percent, gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
        overlap=args.overlap, pin_weight=args.pin_weight, cpu_cache_compute=args.cpu_cache_compute,
        sep_layer=args.sep_layer, weight_buffers=args.weight_buffers)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Weights, caches and slots are long-lived and of few sizes; expandable segments keep the
    # allocator from fragmenting the GPU under a --gpu-mem cap. Read at the first CUDA allocation.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        from .runner import run_throughput  # heavy imports after argument errors are reported
        if args.prompt_len < 1:
            raise EngineError("--prompt-len must be at least 1.")
        for flag, value in (("--gpu-mem", args.gpu_mem), ("--cpu-mem", args.cpu_mem)):
            if value is not None and value <= 0:
                raise EngineError(f"{flag} must be a positive number of GiB.")
        model, folder = resolve_model(args.model)
        policy = policy_from_args(args)
        gen = GenerationConfig(max_new_tokens=args.gen_len, do_sample=args.do_sample, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, stop_token_id=args.stop_token)
        if args.json is not None:
            check_output_file(args.json)
        run_throughput(args, model, None if args.dummy else folder, policy, Workload(args.prompt_len, args.gen_len),
                       gen)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).splitlines()[0][:300]
        print(f"error: the GPU ran out of memory beyond the plan ({first}). Lower --gpu-batch-size or move "
              "weights / KV cache off the GPU (lower the 1st or 3rd --percent value).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    return 0


