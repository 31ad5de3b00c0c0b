"""`offload-engine search`: the best policies for a model, workload and machine, from the cost model.

Also the piece `run --policy auto` uses: `best_policy(args, model, work)`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from offload_engine.policies.memory import GiB, Workload

from ..errors import EngineError, format_size
from ..io.tiers import Tier
from ..metrics import check_output_file, git_commit, write_json_atomic
from .options import add_kv_policy_args, add_model_args, add_positions_arg, model_from_args, kv_settings_from_args, memory_size, positive_int

# Host memory a searched policy leaves free: the process holds some beyond its plan (1.5 GiB of
# 122 GiB peak RSS on OPT-30B), and a host filled to 97% leaves the kernel little page cache.
HOST_HEADROOM_PERCENT = 10

DESCRIPTION = """\
Search the placement (--percent), GPU batch size, number of GPU batches, CPU attention and
compression that maximise throughput (or minimise the batch's latency) under the memory caps,
from a cost model of this machine (`offload-engine profile --out FILE`, or a quick measurement
now). For every combination of the discrete knobs a linear program places the weights, KV cache
and activations; the result is checked with the engine's own memory plan, so every policy
printed is one `offload-engine run` accepts. Predictions are estimates: measure the best few.
"""

EXAMPLES = """\
examples:
  offload-engine profile --out hw.json
  offload-engine search --model opt-30b --prompt-len 512 --gen-len 32 --gpu-mem 16GiB --hardware hw.json
  offload-engine search --model opt-6.7b --compress none both --kv-policy h2o --objective latency
  offload-engine run --model opt-30b --gpu-mem 16GiB --policy auto --hardware hw.json
"""


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="find the best placement policies from a cost model of this machine",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_positions_arg(p)
    w = p.add_argument_group("workload")
    w.add_argument("--prompt-len", type=positive_int, default=512, help="prompt tokens per sequence (default: 512)")
    w.add_argument("--gen-len", type=positive_int, default=32, help="tokens to generate (default: 32)")
    add_search_args(p)
    add_kv_policy_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--top", type=positive_int, default=5, help="policies to print (default: 5)")
    o.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the policies and predictions")
    p.set_defaults(execute=execute)


def add_search_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("search")
    s.add_argument("--hardware", type=Path, default=None, metavar="FILE",
                   help="a profile from `offload-engine profile` (default: a quick measurement of this machine)")
    s.add_argument("--gpu-mem", type=memory_size, default=None, metavar="SIZE",
                   help="cap on GPU memory (default: the profile's free GPU memory)")
    s.add_argument("--cpu-mem", type=memory_size, default=None, metavar="SIZE",
                   help=f"cap on host memory (default: {100 - HOST_HEADROOM_PERCENT}%% of the profile's available "
                        "memory, leaving the rest to the page cache, the libraries and the CUDA context)")
    s.add_argument("--objective", choices=["throughput", "latency"], default="throughput",
                   help="maximise token/s, or minimise the time to finish the batch (default: throughput)")
    s.add_argument("--compress", nargs="+", choices=["none", "cache", "weight", "both"], default=["none"],
                   help="compression settings to consider (default: none)")
    s.add_argument("--max-batch", type=positive_int, default=512, help="largest GPU batch to consider (default: 512)")


def hardware_for(args: argparse.Namespace):
    """The profile (loaded or measured now), with the --gpu-mem / --cpu-mem caps applied."""
    from offload_engine.policies.hardware import HardwareProfile

    if args.hardware is not None:
        hw = HardwareProfile.load(args.hardware)
    else:
        import torch

        from ..hardware_probe import profile_machine, sizes_for
        cuda = torch.cuda.is_available()
        print("measuring this machine (pass --hardware FILE to reuse a profile)...", file=sys.stderr)
        hw = profile_machine(torch.device("cuda" if cuda else "cpu"), Path(getattr(args, "offload_dir", "offload_dir")),
                             sizes_for(cuda, quick=True), log=lambda *_: None)
    if not hw.gpu_mem_bytes:  # no GPU: the "GPU" tier and the CPU tier come out of host memory
        return _shared_tiers(args, hw)
    if args.gpu_mem:
        if args.gpu_mem > hw.gpu_mem_bytes:
            print(f"--gpu-mem {format_size(args.gpu_mem)} is more than the profile's GPU has free: searching "
                  f"under its {format_size(hw.gpu_mem_bytes)}", file=sys.stderr)
        hw = replace(hw, gpu_mem_bytes=min(hw.gpu_mem_bytes, args.gpu_mem))
    cpu = args.cpu_mem or hw.cpu_mem_bytes * (100 - HOST_HEADROOM_PERCENT) // 100
    return replace(hw, cpu_mem_bytes=cpu)


def _shared_tiers(args: argparse.Namespace, hw):
    """Caps where the GPU tier is host memory too: --gpu-mem (default: half of it), --cpu-mem
    (default: the rest, less the headroom), together no more than the host has, as `run` checks."""
    pool = hw.cpu_mem_bytes
    gpu = min(args.gpu_mem, pool) if args.gpu_mem else hw.tiers_as_the_engine_sees_them().gpu_mem_bytes
    if args.gpu_mem and args.gpu_mem > pool:
        print(f"--gpu-mem {format_size(args.gpu_mem)} is more than the profile's {format_size(pool)} of host "
              f"memory (the GPU tier is the CPU): searching under {format_size(gpu)}", file=sys.stderr)
    cpu = args.cpu_mem or (pool - gpu) * (100 - HOST_HEADROOM_PERCENT) // 100
    if gpu + cpu > pool:  # `run` refuses a plan whose two tiers together exceed the host
        print(f"the GPU tier is the CPU here and shares its {format_size(pool)} with the CPU tier: searching "
              f"under --cpu-mem {format_size(pool - gpu)}", file=sys.stderr)
        cpu = pool - gpu
    return replace(hw, gpu_mem_bytes=gpu, cpu_mem_bytes=cpu)


def sizing_dtype(args: argparse.Namespace, cuda: bool):
    """The dtype `run` computes in, which the plan is sized at: --dtype, else the engine's default
    (float16 on a GPU, float32 on the CPU)."""
    import torch

    if getattr(args, "dtype", None):
        return getattr(torch, args.dtype)
    return torch.float16 if cuda else torch.float32


def size_flag(nbytes: int) -> str:
    """A --gpu-mem / --cpu-mem value `run` reads back as at least `nbytes` (whole MiB, rounded up)."""
    if nbytes % (1 << 30) == 0:
        return f"{nbytes >> 30}GiB"
    return f"{-(-nbytes // (1 << 20))}MiB"


def replay_flags(args: argparse.Namespace, hw, dtype) -> list[str]:
    """The flags beyond the policy that `run` needs to plan what the search planned: the memory
    caps, the dtype where `run` would choose another here, the KV policy's settings, --dummy."""
    import torch

    flags = ["--gpu-mem", size_flag(hw.gpu_mem_bytes), "--cpu-mem", size_flag(hw.cpu_mem_bytes)]
    default = torch.float16 if torch.cuda.is_available() else torch.float32
    if getattr(args, "dtype", None) or dtype != default:
        flags += ["--dtype", str(dtype).replace("torch.", "")]
    if args.kv_policy != "full":
        kv = argparse.ArgumentParser(add_help=False)
        add_kv_policy_args(kv)
        for a in kv._actions:
            value = getattr(args, a.dest, a.default)
            if a.dest == "kv_policy" or value == a.default:
                continue
            flags += [a.option_strings[0]] if isinstance(a, argparse._StoreTrueAction) else \
                [a.option_strings[0], f"{value:g}" if isinstance(value, float) else str(value)]
    if getattr(args, "max_positions", None):
        flags += ["--max-positions", str(args.max_positions)]
    if getattr(args, "dummy", False):
        flags.append("--dummy")
    return flags


def _refuse_oversized(model, work: Workload, hw, space, dtype) -> None:
    """No policy can fit a model whose weights and KV cache exceed the three tiers together, at
    the smallest batch and the most compression searched: refused from size arithmetic, before
    the search builds any layer list."""
    from offload_engine.policies.memory import size_floor
    from offload_engine.policies.placement import Policy

    weight = any(c in ("weight", "both") for c in space.compression)
    cache = any(c in ("cache", "both") for c in space.compression)
    need = min(sum(size_floor(model, Policy(gpu_batch_size=min(space.gpu_batch_sizes), kv=kv,
                                            compress_weight=space.quant if weight else None,
                                            compress_cache=space.quant if cache else None), work, dtype))
               for kv in space.kv)
    room = hw.gpu_mem_bytes + hw.cpu_mem_bytes + hw.disk_free_bytes
    if need > room:
        raise EngineError(f"no policy fits {model.name}: its weights and KV cache alone need {format_size(need)} "
                          f"but the GPU, CPU and disk tiers have {format_size(room)} together.",
                          "Check the model's config, allow compression (--compress both) or shorten the workload.")


def run_search(args: argparse.Namespace, model, work: Workload, top: int, dtype=None):
    """`dtype`: what the run computes in (default: `sizing_dtype` for the profile's device)."""
    from offload_engine.policies import Compression
    from offload_engine.policies.search import SearchSpace, search

    batches = tuple(b for b in SearchSpace().gpu_batch_sizes if b <= args.max_batch)
    space = SearchSpace(gpu_batch_sizes=batches, compression=tuple(args.compress), kv=(kv_settings_from_args(args),),
                        quant=Compression(getattr(args, "quant_bits", 4), getattr(args, "quant_group_size", None) or 64))
    hw = hardware_for(args)
    dtype = dtype or sizing_dtype(args, cuda=not hw.cpu_device)
    _refuse_oversized(model, work, hw, space, dtype)
    found = search(model, work, hw, space, args.objective, top, dtype=dtype)
    if not found:
        raise EngineError(f"no policy fits {model.name} with {work.prompt_len}+{work.gen_len} tokens in "
                          f"{format_size(hw.gpu_mem_bytes)} of GPU and {format_size(hw.cpu_mem_bytes)} of host memory.",
                          "Raise the caps, allow compression (--compress both) or shorten the workload.")
    return found, hw, dtype


def best_policy(args: argparse.Namespace, model, work: Workload, dtype=None):
    """The searched policy `run --policy auto` runs, with the run's own schedule flags kept."""
    found, _, _ = run_search(args, model, work, 1, dtype)
    best = found[0].policy
    print(f"searched policy: --percent {' '.join(f'{p:g}' for p in best.percent)} --gpu-batch-size "
          f"{best.gpu_batch_size} --num-gpu-batches {best.num_gpu_batches}"
          + (" --cpu-cache-compute" if best.cpu_cache_compute else "")
          + f" (predicted {found[0].throughput:.1f} token/s)", file=sys.stderr)
    return best, found[0]


def execute(args: argparse.Namespace) -> dict:
    from offload_engine.policies.search import command_line

    if args.json is not None:
        check_output_file(args.json)
    resolved = model_from_args(args, dummy=True)  # the architecture is all the search needs
    work = Workload(args.prompt_len, args.gen_len)
    found, hw, dtype = run_search(args, resolved.config, work, args.top)
    extra = replay_flags(args, hw, dtype)
    print(f"{resolved.config.name}, {work.prompt_len}+{work.gen_len} tokens, GPU {hw.gpu_mem_bytes / GiB:.1f} GiB, "
          f"host {hw.cpu_mem_bytes / GiB:.1f} GiB, profile {hw.name}; best by {args.objective}:")
    print(f"{'#':>2} {'token/s':>9} {'latency s':>10} {'batch':>8} {'GPU GiB':>8} {'CPU GiB':>8} {'disk GiB':>8}  command")
    rows = []
    for i, est in enumerate(found, 1):
        cmd = command_line(args.model, work, est, extra)
        mem = {t: est.memory[t] / GiB for t in Tier}
        print(f"{i:>2} {est.throughput:>9.1f} {est.total_s:>10.2f} {est.policy.gpu_batch_size:>4}x{est.policy.num_gpu_batches:<3}"
              f"{mem[Tier.GPU]:>8.2f} {mem[Tier.CPU]:>8.2f} {mem[Tier.DISK]:>8.2f}  {cmd}")
        rows.append({"predicted_throughput": est.throughput, "predicted_total_s": est.total_s,
                     "prefill_s": est.prefill_s, "step_s": est.step_s, "parts_s": est.parts,
                     "memory_gib": {t.value: v for t, v in mem.items()}, "policy": asdict(est.policy), "command": cmd})
    data = {"model": resolved.config.name, "workload": asdict(work), "objective": args.objective,
            "hardware": asdict(hw), "policies": rows, "commit": git_commit()}
    if args.json:
        write_json_atomic(args.json, data)
    return data
