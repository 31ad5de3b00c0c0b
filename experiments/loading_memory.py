"""Peak host memory while loading a checkpoint, against what the plan puts in host memory.

  PYTHONPATH=. python experiments/loading_memory.py --out experiments/results/loading_memory.json

Loads SmolLM2-135M from its Q4_1 GGUF (dequantized to float32 one tensor at a time) with the
weights on each tier, on the CPU device (where the "GPU" tier is host memory too), and reports
the anonymous resident memory the load added (RssAnon: heap and pinned buffers, not the file's
mapped pages) beside the planned host bytes and the largest single tensor.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_engine.engine import Engine, EngineOptions  # noqa: E402
from offload_engine.io.tiers import Tier  # noqa: E402
from offload_engine.metrics import PeakHostMemory, git_commit, hardware, write_json_atomic  # noqa: E402
from offload_engine.model_zoo import resolve_model  # noqa: E402
from offload_engine.models import build_layers  # noqa: E402
from offload_engine.policies.memory import Workload  # noqa: E402
from offload_engine.policies.placement import Policy  # noqa: E402

MiB = float(1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    resolved = resolve_model(args.model)
    largest = max(s.numel() for layer in build_layers(resolved.config) for s in layer.weight_specs()) * 4
    rows = []
    for name, percent in (("weights on disk", (0, 0, 100, 0, 100, 0)), ("weights on the CPU tier", (0, 100, 100, 0, 100, 0)),
                          ("weights on the compute device", (100, 0, 100, 0, 100, 0))):
        opts = EngineOptions(checkpoint=resolved.source, offload_dir=args.out.parent / "offload", progress=False,
                             dtype=torch.float32, device="cpu")
        with PeakHostMemory() as loading:
            engine = Engine(resolved.config, Policy.from_percent(percent, gpu_batch_size=1), Workload(16, 4), opts)
        with engine:
            planned = sum(engine.plan.persistent_bytes(t) for t in (Tier.GPU, Tier.CPU))
            model = engine.plan.model_bytes
        rows.append(dict(placement=name, added_peak_mib=loading.added_bytes / MiB, planned_host_mib=planned / MiB,
                         model_mib=model / MiB, largest_tensor_mib=largest / MiB,
                         over_plan_mib=(loading.added_bytes - planned) / MiB))
        print(f"{name:32s} added {loading.added_bytes / MiB:8.1f} MiB  planned host {planned / MiB:8.1f} MiB  "
              f"model {model / MiB:7.1f} MiB  largest tensor {largest / MiB:6.1f} MiB")
    write_json_atomic(args.out, dict(model=resolved.config.name, checkpoint=str(resolved.source.name), rows=rows,
                                     hardware=hardware(), commit=git_commit()))


if __name__ == "__main__":
    main()
