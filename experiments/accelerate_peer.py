"""Hugging Face transformers + Accelerate offloading as a peer of the benchmark suite.

  python experiments/accelerate_peer.py --model opt-30b --prompt-len 512 --gen-len 32 --batch-size 8 \\
      --gpu-cap-gib 16 --gpu-weights-gib 10 --cut-gen-len 5 --offload-dir /tmp/offload_bench/accelerate

`OPTForCausalLM` with random fp16 weights of the published architecture (nothing is downloaded),
placed by Accelerate's `device_map="auto"` under `max_memory={0: gpu_weights_gib, "cpu": cpu_gib}`:
whole decoder layers on the GPU while they fit, then in CPU RAM, then on disk (`offload_folder`).
Offloaded layers are copied to the GPU by Accelerate's hooks at every forward (what its users get:
pageable memory, no overlap); the KV cache and the activations stay on the GPU. `generate` runs
greedily on a batch of random prompts; the first token's time is the prefill, the rest the decode.
The report uses FlexGen's lines (`prefill latency: X s`, ..., `total throughput: Z token/s`, `peak
gpu mem: W GB`, GB meaning GiB as in FlexGen) so the suite reads it with FlexGen's parser, plus a
`weights placed:` line (the tiers Accelerate chose) and `batch size:`.

Two ways to get the weights, the same `dispatch_model` hooks at run time:
- `--weights memory` (default): the model is built on the meta device, materialised in CPU RAM from
  a pool of random values and dispatched with `accelerate.dispatch_model`, which is what
  `from_pretrained(device_map="auto")` does once it has read the files. No checkpoint is written:
  OPT-30B's 56 GiB would nearly fill the lent machine's 64 GiB disk and take minutes.
- `--weights checkpoint`: random weights are written as a sharded safetensors checkpoint in
  `--offload-dir` and loaded with `from_pretrained(..., device_map="auto", max_memory=...,
  offload_folder=...)`, the exact user path (fine for OPT-6.7B; OPT-30B needs 56 GiB of disk).
`--cut-gen-len N` generates N tokens and extrapolates the decode time to `--gen-len` as FlexGen
does (its `project_decode_latency`): Accelerate's OPT-30B decodes at about 6 s a step.
Without CUDA everything runs on the CPU (RAM and disk tiers only): the tests' smoke runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

GiB = 2**30
# name: (layers, hidden, heads); ffn is 4 x hidden, vocabulary 50272, 2048 positions. "tiny" is for tests.
OPT_SIZES = {"tiny": (4, 256, 4), "opt-125m": (12, 768, 12), "opt-1.3b": (24, 2048, 32), "opt-2.7b": (32, 2560, 32),
             "opt-6.7b": (32, 4096, 32), "opt-13b": (40, 5120, 40), "opt-30b": (48, 7168, 56),
             "opt-66b": (64, 9216, 72)}
PLACED = re.compile(r"weights placed: gpu ([0-9.]+) GB, cpu ([0-9.]+) GB, disk ([0-9.]+) GB")


def parse_placement(text: str) -> dict[str, float] | None:
    """GiB of weights per tier from the last `weights placed:` line of a report, or None."""
    hits = PLACED.findall(text)
    return dict(zip(("gpu", "cpu", "disk"), map(float, hits[-1]))) if hits else None


def opt_config(name: str):
    from transformers import OPTConfig

    layers, hidden, heads = OPT_SIZES[name]
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=4 * hidden,
                     word_embed_proj_dim=hidden, vocab_size=50272, max_position_embeddings=2048,
                     do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)


def empty_model(config):
    """The model on the meta device, fp16, with its head tied to the embedding (as from_pretrained ties it)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import OPTForCausalLM

    with init_empty_weights():
        model = OPTForCausalLM(config).to(torch.float16)
    model.tie_weights()
    return model


def random_tensors(model, seed: int):
    """(name, fp16 tensor) for every distinct parameter, slices of one random pool at random offsets
    (values N(0, 0.02) as OPT's init; drawing 30 G values one by one would take minutes)."""
    import torch

    params = list(model.named_parameters())  # deduplicated: the tied head appears once
    largest = max(p.numel() for _, p in params)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(largest + 4096, generator=g) * 0.02).to(torch.float16)
    for name, p in params:
        off = int(torch.randint(0, 4097, (1,), generator=g))
        yield name, pool[off:off + p.numel()].view(p.shape)


def max_memory(args) -> dict:
    """Accelerate's `max_memory`: the GPU's weight budget (when there is a GPU) and the CPU's."""
    import torch

    memory: dict = {"cpu": f"{args.cpu_gib:g}GiB"}
    if torch.cuda.is_available():
        gpu = args.gpu_weights_gib or args.gpu_cap_gib or torch.cuda.mem_get_info()[0] / GiB
        memory = {0: f"{gpu:g}GiB", **memory}
    return memory


def placement(model, device_map: dict) -> dict[str, float]:
    """GiB of weights Accelerate put on each tier."""
    import torch
    from accelerate.utils import compute_module_sizes

    sizes, out = compute_module_sizes(model, dtype=torch.float16), {"gpu": 0.0, "cpu": 0.0, "disk": 0.0}
    for module, device in device_map.items():
        tier = device if device in ("cpu", "disk") else "gpu"
        out[tier] += sizes.get(module, 0) / GiB
    return out


def load_in_memory(config, args):
    """Materialise random weights in CPU RAM, then place them as from_pretrained would."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map

    model = empty_model(config)
    device_map = infer_auto_device_map(model, max_memory=args.max_memory, dtype=torch.float16,
                                       no_split_module_classes=model._no_split_modules)
    if set(device_map.values()) == {"disk"}:  # dispatch_model cannot offload the root module itself
        raise ValueError(f"--cpu-gib {args.cpu_gib:g} holds none of the model: raise it.")
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module a new tensor: tie the head again
    with torch.no_grad():
        for name, values in random_tensors(model, args.seed):
            model.get_parameter(name).copy_(values)
    model = dispatch_model(model, device_map, offload_dir=str(args.offload_dir / "accelerate_offload"))
    return model, device_map


def write_checkpoint(config, folder: Path, seed: int, shard_gib: float = 2.0) -> None:
    """A sharded safetensors checkpoint (config.json, shards, index) of random fp16 weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    shards: list[dict] = [{}]
    for name, values in random_tensors(empty_model(config), seed):
        if shards[-1] and sum(t.numel() for t in shards[-1].values()) * 2 + values.numel() * 2 > shard_gib * GiB:
            shards.append({})
        shards[-1][name] = values
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.clone() for k, v in shard.items()}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(v.numel() * 2 for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def load_checkpoint(config, args):
    """Write the checkpoint into the offload folder and load it the way users do."""
    import torch
    from transformers import OPTForCausalLM

    folder = args.offload_dir / "checkpoint"
    write_checkpoint(config, folder, args.seed)
    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="auto",
                                           max_memory=args.max_memory,
                                           offload_folder=str(args.offload_dir / "accelerate_offload"))
    return model, getattr(model, "hf_device_map", None) or {"": "cpu"}


def timed_generate(model, ids, new_tokens: int) -> tuple[float, list[float]]:
    """Greedy generate; returns (prefill seconds, seconds of each decode step), timed by a stopping
    criterion that synchronises after every token (generate synchronises each step anyway)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    cuda = ids.is_cuda

    class Stamp(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **_):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    stamp = Stamp()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=1,
                       stopping_criteria=StoppingCriteriaList([stamp]))
    t = stamp.times
    if len(t) != new_tokens:
        raise RuntimeError(f"generate produced {len(t)} tokens, not {new_tokens}")
    return t[0] - t0, [b - a for a, b in zip(t, t[1:])]


def project_decode(steps: list[float], gen_len: int) -> float:
    """Decode seconds for gen_len - 1 steps: measured when all ran, else FlexGen's projection
    (the first two steps as measured, the mean of the others for the remaining ones)."""
    if len(steps) >= gen_len - 1:
        return sum(steps)
    warm = min(2, len(steps) - 1)
    return sum(steps[:warm]) + statistics.mean(steps[warm:]) * (gen_len - 1 - warm)


def report(args, config, placed: dict, prefill_s: float, decode_s: float, peak_gib: float, projected: bool) -> str:
    """FlexGen's report lines (write_benchmark_log), GB meaning GiB as there."""
    b, h, layers = args.batch_size, config.hidden_size, config.num_hidden_layers
    tokens = args.prompt_len + args.gen_len
    model_gib = sum(placed.values())
    cache_gib, hidden_gib = b * tokens * layers * 2 * h * 2 / GiB, b * tokens * h * 2 / GiB
    total = prefill_s + decode_s
    return (f"batch size: {b}\n"
            f"weights placed: gpu {placed['gpu']:.3f} GB, cpu {placed['cpu']:.3f} GB, disk {placed['disk']:.3f} GB\n"
            f"model size: {model_gib:.3f} GB\tcache size: {cache_gib:.3f} GB\thidden size (p): {hidden_gib:.3f} GB\n"
            f"peak gpu mem: {peak_gib:.3f} GB\tprojected: {projected}\n"
            f"prefill latency: {prefill_s:.3f} s\tprefill throughput: {b * args.prompt_len / prefill_s:.3f} token/s\n"
            f"decode latency: {decode_s:.3f} s\t"
            f"decode throughput: {b * (args.gen_len - 1) / max(decode_s, 1e-10):.3f} token/s\n"
            f"total latency: {total:.3f} s\ttotal throughput: {b * args.gen_len / total:.3f} token/s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(OPT_SIZES), default="opt-6.7b")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gpu-cap-gib", type=float, default=None,
                    help="limit everything PyTorch allocates on the GPU (emulates a smaller card)")
    ap.add_argument("--gpu-weights-gib", type=float, default=None,
                    help="max_memory of the GPU for weights (default: the cap, else the free memory); "
                         "the KV cache and activations need the rest")
    ap.add_argument("--cpu-gib", type=float, default=None,
                    help="max_memory of the CPU; weights beyond it go to disk (default: 85%% of available RAM)")
    ap.add_argument("--offload-dir", type=Path, default=Path("/tmp/offload_bench/accelerate"))
    ap.add_argument("--cut-gen-len", type=int, default=None, help="generate this many tokens and extrapolate")
    ap.add_argument("--weights", choices=["memory", "checkpoint"], default="memory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if min(args.prompt_len, args.gen_len, args.batch_size) < 1 or args.prompt_len + args.gen_len > 2048:
        ap.error("--prompt-len, --gen-len and --batch-size must be positive and prompt + gen at most 2048 "
                 "(OPT's positions): change them.")
    if args.cut_gen_len is not None and args.cut_gen_len < 2:
        ap.error("--cut-gen-len must be at least 2 (one decode step to extrapolate from): raise it.")
    if args.cpu_gib is None:
        args.cpu_gib = round(0.85 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.gpu_cap_gib and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(args.gpu_cap_gib * GiB / total)
    config, args.max_memory = opt_config(args.model), max_memory(args)  # before loading: it reads free memory
    t0 = time.perf_counter()
    model, device_map = (load_in_memory if args.weights == "memory" else load_checkpoint)(config, args)
    placed = placement(model, device_map)
    print(f"<accelerate_peer>: {args.model}, {args.weights} weights, max_memory {args.max_memory}, "
          f"loaded in {time.perf_counter() - t0:.1f} s, {'cuda' if cuda else 'cpu only'}", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, config.vocab_size, (args.batch_size, args.prompt_len), generator=g)
    ids = ids.to("cuda" if cuda else "cpu")
    timed_generate(model, ids[:, :32], 1)  # warm-up, as FlexGen's: 32-token prompts, one token
    new_tokens = min(args.cut_gen_len or args.gen_len, args.gen_len)
    prefill_s, steps = timed_generate(model, ids, new_tokens)
    peak = torch.cuda.max_memory_allocated() / GiB if cuda else 0.0
    print(report(args, config, placed, prefill_s, project_decode(steps, args.gen_len), peak,
                 projected=new_tokens < args.gen_len), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
