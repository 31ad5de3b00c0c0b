"""The search's best OPT-30B policy against FlexGen's hand-tuned one, measured in the same call.

FlexGen's benchmark suite tunes OPT-30B at 512+32 by hand: `--percent 20 80 0 100 0 100
--gpu-batch-size 48 --num-gpu-batches 3 --cpu` (its `suite_30b_1x1`). That batch plans about
150 GiB of host memory (a 100 GiB KV cache beside 45 GiB of weights), more than a 128 GiB host
has, so FlexGen is run at the larger of 48x2 and 24x2 that runs (it decodes 5 steps and
extrapolates, as in experiments/bench_suite.py). This engine runs the policy that
`offload-engine search` ranks first under the same 16 GiB GPU cap, decoding every step.

  offload-engine profile --out hw.json
  PYTHONPATH=. python experiments/search_vs_flexgen.py --hardware hw.json --out DIR [--copy-to $OUT]

Writes DIR/search.json (the search's ranking), DIR/summary.json (both runs, predicted and
measured) and one log per run. Needs a GPU and the `flexgen` package (see bench_suite.py).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.suite_report import parse_report  # noqa: E402
from offload_engine.metrics import git_commit, hardware, write_json_atomic  # noqa: E402
from offload_engine.sweep.runner import run_process  # noqa: E402

WORKLOAD = ["--prompt-len", "512", "--gen-len", "32"]
GPU_CAP = "16GiB"
HAND_PERCENT = ["20", "80", "0", "100", "0", "100"]
HAND_BATCHES = [(48, 2), (24, 2)]  # its 48x3 halved in GPU batches, then the batch of the shared anchor


def searched_flags(command: str) -> list[str]:
    """`offload-engine run` flags of a policy from `search --json` (its command line, less the program)."""
    words = shlex.split(command)
    if words[:2] != ["offload-engine", "run"]:
        raise ValueError(f"not an `offload-engine run` command line: {command!r}")
    return words[2:]


def run_ours(rank: int, choice: dict, out: Path, timeout_s: float) -> dict:
    json_path = out / f"ours-{rank}.json"
    cmd = [sys.executable, "-m", "offload_engine", "run", "--quiet", *searched_flags(choice["command"]),
           "--gpu-mem", GPU_CAP, "--offload-dir", str(out / "offload"),
           "--json", str(json_path)]
    outcome = run_process(cmd, timeout_s, out / f"ours-{rank}.log")
    shutil.rmtree(out / "offload", ignore_errors=True)
    record = {"system": "ours", "search_rank": rank, "command": cmd, "rc": outcome.rc, "wall_s": outcome.wall_s,
              "predicted_throughput": choice["predicted_throughput"]}
    if outcome.rc == 0 and json_path.exists():
        record["metrics"] = json.loads(json_path.read_text())["metrics"]
    return record


def run_flexgen(out: Path, timeout_s: float, batches: list[tuple[int, int]]) -> dict:
    record: dict = {"system": "flexgen", "version": "0.1.8", "attempts": []}
    for batch in batches:
        cmd = [sys.executable, str(ROOT / "experiments" / "flexgen_peer.py"), "--model", "facebook/opt-30b",
               "--path", "_DUMMY_", *WORKLOAD, "--cut-gen-len", "5", "--percent", *HAND_PERCENT,
               "--gpu-batch-size", str(batch[0]), "--num-gpu-batches", str(batch[1]), "--cpu-cache-compute",
               "--gpu-cap-gib", "16", "--offload-dir", str(out / "offload"), "--log-file", "/dev/null"]
        log = out / f"flexgen-{batch[0]}x{batch[1]}.log"
        outcome = run_process(cmd, timeout_s, log)
        shutil.rmtree(out / "offload", ignore_errors=True)
        metrics = parse_report(outcome.text)
        record.update(command=cmd, rc=outcome.rc, wall_s=outcome.wall_s, batch=list(batch))
        record["attempts"].append({"batch": list(batch), "rc": outcome.rc, "wall_s": outcome.wall_s,
                                   "timed_out": outcome.timed_out})
        if outcome.rc == 0 and "total_throughput" in metrics:
            record["metrics"] = metrics
            return record
    return record


def batch_arg(text: str) -> tuple[int, int]:
    try:
        size, count = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch like 24x2 (GPU batch size x GPU batches)") from None
    return size, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", type=Path, required=True, help="a profile of this machine (offload-engine profile)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tries", type=int, default=2, help="searched policies to try in rank order while one fails")
    parser.add_argument("--timeout-s", type=float, default=300, help="the most one run may take")
    parser.add_argument("--commit", default=None, help="this repository's commit (the device copy has no .git)")
    parser.add_argument("--copy-to", type=Path, default=None)
    parser.add_argument("--flexgen-batches", type=batch_arg, nargs="+", default=HAND_BATCHES, metavar="BxN",
                        help="FlexGen's batches, tried in turn until one runs (default: 48x2 24x2)")
    args = parser.parse_args()
    for folder in (args.out, args.copy_to):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
    search_json = args.out / "search.json"
    cmd = [sys.executable, "-m", "offload_engine", "search", "--model", "opt-30b", *WORKLOAD, "--gpu-mem", GPU_CAP,
           "--hardware", str(args.hardware), "--top", str(args.tries), "--json", str(search_json)]
    if run_process(cmd, args.timeout_s, args.out / "search.log").rc != 0:
        print((args.out / "search.log").read_text(), file=sys.stderr)
        return 1
    ranking = json.loads(search_json.read_text())["policies"]
    runs: list[dict] = []
    summary = {"hardware": hardware(), "commit": args.commit or git_commit(), "gpu_cap": GPU_CAP, "runs": runs}

    def record(run: dict) -> None:  # the summary is rewritten after every run: a cut-off call keeps what ran
        runs.append(run)
        ours = next((r for r in runs if r["system"] == "ours" and "metrics" in r), None)
        flex = next((r for r in runs if r["system"] == "flexgen" and "metrics" in r), None)
        if ours and flex:
            summary["speedup"] = ours["metrics"]["total_throughput"] / flex["metrics"]["total_throughput"]
        write_json_atomic(args.out / "summary.json", summary)
        if args.copy_to is not None:  # the JSON files, and the logs in one tarball: few files, however many runs
            for f in args.out.glob("*.json"):
                shutil.copy(f, args.copy_to / f.name)
            with tarfile.open(args.copy_to / "logs.tar.gz", "w:gz") as tar:
                for log in sorted(args.out.glob("*.log")):
                    tar.add(log, arcname=log.name)

    for rank, choice in enumerate(ranking, 1):
        record(run_ours(rank, choice, args.out, args.timeout_s))
        if "metrics" in runs[-1]:
            break
    record(run_flexgen(args.out, args.timeout_s, args.flexgen_batches))
    for r in runs:
        tput = r.get("metrics", {}).get("total_throughput")
        print(f"{r['system']}: " + (f"{tput:.1f} token/s" if tput else f"failed (rc {r['rc']})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
