"""The Accelerate peer and the papers' tables without a GPU: the peer's commands (checked against
its own parser), its report read by the suite's FlexGen parser (canned text, and a real run of a
tiny OPT on the CPU with RAM and disk tiers), the suite driving it with a fake runner, the tables
built from canned runs.jsonl folders, and the device calls --print-commands plans."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import accelerate_peer as peer
from experiments import bench_suite as bs
from experiments import paper_tables as pt
from experiments.cases import ALL_GPU, CASES, Accelerate, Case, FlexGen, validate

ROOT = Path(__file__).resolve().parent.parent

# What accelerate_peer.py prints for OPT-30B at batch 8 (the shared H100 baseline's numbers:
# prefill 6.923 s, 6.378 s a decode step for 31 steps).
ACCEL_OUT = """\
<accelerate_peer>: opt-30b, memory weights, max_memory {0: '10GiB', 'cpu': '100GiB'}, loaded in 21.0 s, cuda
batch size: 8
weights placed: gpu 8.652 GB, cpu 47.179 GB, disk 0.000 GB
model size: 55.831 GB\tcache size: 5.578 GB\thidden size (p): 0.058 GB
peak gpu mem: 14.897 GB\tprojected: True
prefill latency: 6.923 s\tprefill throughput: 591.651 token/s
decode latency: 197.710 s\tdecode throughput: 1.254 token/s
total latency: 204.633 s\ttotal throughput: 1.251 token/s
"""
FLEXGEN_OUT = """\
peak gpu mem: 8.997 GB\tprojected: True
prefill latency: 5.590 s\tprefill throughput: 4396.768 token/s
decode latency: 101.792 s\tdecode throughput: 14.618 token/s
total latency: 107.381 s\ttotal throughput: 14.304 token/s
"""
OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# --- the peer: commands, report, a real run ----------------------------------------------------------

def test_accelerate_commands_from_cases_parse_with_the_peers_parser(tmp_path, capsys):
    case = CASES["table-opt30b-cap16-512+32"]
    cmd = bs.accelerate_command(case, (12, 1), tmp_path / "off")
    assert cmd[1].endswith("experiments/accelerate_peer.py") and arg(cmd, "--model") == "opt-30b"
    assert (arg(cmd, "--batch-size"), arg(cmd, "--gpu-weights-gib"), arg(cmd, "--gpu-cap-gib")) == ("12", "4", "16")
    assert arg(cmd, "--cut-gen-len") == "5" and arg(cmd, "--offload-dir") == str(tmp_path / "off")
    small = bs.accelerate_command(CASES["table-opt6.7b-gpu"], (256, 1), tmp_path / "off")
    assert not {"--gpu-cap-gib", "--gpu-weights-gib", "--cut-gen-len", "--cpu-gib"} & set(small)
    with_accel = [c for c in CASES.values() if c.accelerate]
    assert len(with_accel) >= 7
    for c in with_accel:  # every candidate of every case is a valid peer command that means what the case says
        for batch in c.accelerate.batches():
            args = peer.parse_args(bs.accelerate_command(c, batch, tmp_path / "off")[2:])
            assert (args.model, args.prompt_len, args.gen_len, args.batch_size) == \
                (c.model, c.prompt_len, c.gen_len, batch[0])
            assert args.gpu_cap_gib == c.gpu_cap_gib and args.gpu_weights_gib == c.accelerate.gpu_weights_gib
            assert args.cut_gen_len == c.accelerate.cut_gen_len
    # the dry run prints the peer's command and the shared FlexGen run once
    assert bs.main(["--out", str(tmp_path / "o"), "--dry-run", "--cases", "table-opt30b-cap16-*"]) == 0
    text = capsys.readouterr().out
    assert text.count("## accelerate table-opt30b-cap16-512+32") == 1
    assert text.count("## flexgen opt30b-cap16-cpuattn") == 1 and text.count("## flexgen opt30b-h2o-512+512") == 1
    assert "accelerate_peer.py --model opt-30b --prompt-len 512 --gen-len 32 --batch-size 16" in text
    assert "# if 16x1 does not fit:" in text and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, message", [
    (Accelerate(4, batch_candidates=(8,)), "descending"),
    (Accelerate(4, gpu_weights_gib=20), "within the GPU cap"),
    (Accelerate(4, cut_gen_len=8), "below gen_len"),
])
def test_validate_refuses_bad_accelerate_flags(bad, message):
    with pytest.raises(ValueError, match=message):
        validate({"x": Case("x", "opt-125m", 32, 8, 16, None, None, accelerate=bad)})
    with pytest.raises(ValueError, match="no system's flags"):
        validate({"x": Case("x", "opt-125m", 32, 8, 16, None, None)})


def test_report_is_read_by_the_suites_parser():
    assert bs.parse_report(ACCEL_OUT) == {
        "model_gib": 55.831, "cache_gib": 5.578, "hidden_gib": 0.058, "peak_gpu_mem_gib": 14.897, "prefill_s": 6.923,
        "prefill_throughput": 591.651, "decode_s": 197.71, "decode_throughput": 1.254, "total_s": 204.633,
        "total_throughput": 1.251, "projected": True}
    assert peer.parse_placement(ACCEL_OUT) == {"gpu": 8.652, "cpu": 47.179, "disk": 0.0}
    assert peer.parse_placement("Traceback ...") is None
    # the peer writes these lines: FlexGen's formulas, batch x gen_len / (prefill + decode)
    args = argparse.Namespace(batch_size=8, prompt_len=512, gen_len=32)
    text = peer.report(args, peer.opt_config("opt-30b"), {"gpu": 8.652, "cpu": 47.179, "disk": 0.0},
                       6.923, 197.71, 14.897, True)
    assert text == ACCEL_OUT.split("\n", 1)[1].rstrip("\n")
    assert 8 * 32 / (6.923 + 197.71) == pytest.approx(1.251, abs=5e-4)


def test_decode_projection_is_flexgens():
    steps = [1.0, 2.0, 3.0, 5.0]  # FlexGen: the first two decode steps as measured, their mean for the rest
    assert peer.project_decode(steps, 32) == pytest.approx(1.0 + 2.0 + 4.0 * 29)
    assert peer.project_decode(steps, 5) == pytest.approx(11.0)  # every step ran: the sum
    assert peer.project_decode([0.5], 10) == pytest.approx(0.5 * 9)


@pytest.mark.parametrize("weights", ["memory", "checkpoint"])
def test_peer_runs_a_tiny_opt_on_cpu_with_ram_and_disk(tmp_path, weights):
    cmd = [sys.executable, str(ROOT / "experiments" / "accelerate_peer.py"), "--model", "tiny", "--prompt-len", "16",
           "--gen-len", "8", "--batch-size", "2", "--cpu-gib", "0.03", "--cut-gen-len", "5", "--weights", weights,
           "--offload-dir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    r, placed = bs.parse_report(p.stdout), peer.parse_placement(p.stdout)
    assert placed["cpu"] > 0 and placed["disk"] > 0 and placed["gpu"] == 0  # 4 layers: 2 in RAM, 2 on disk
    assert r["projected"] is True and r["total_throughput"] > 0 and r["prefill_s"] > 0 and r["decode_s"] > 0
    # FlexGen's definition. All three are printed to 3 decimals: the two latencies to 0.5 ms each,
    # the throughput to 5e-4 token/s, which moves 16 / throughput by 16 * 5e-4 / throughput^2 s.
    slack = 1.5e-3 + 2 * 8 * 5e-4 / r["total_throughput"] ** 2
    assert 2 * 8 / r["total_throughput"] == pytest.approx(r["prefill_s"] + r["decode_s"], abs=slack)
    assert r["model_gib"] == pytest.approx(placed["cpu"] + placed["disk"], abs=2e-3)
    if weights == "checkpoint":
        index = json.loads((tmp_path / "checkpoint" / "model.safetensors.index.json").read_text())
        assert "lm_head.weight" not in index["weight_map"] and len(index["weight_map"]) == 4 * 16 + 4


# --- the suite drives the peer -------------------------------------------------------------------------

class FakeRunner:
    """FlexGen's report for FlexGen; for Accelerate, out of memory at `oom` batches, else its report."""

    def __init__(self, oom: tuple[str, ...] = ()):
        self.calls: list[list[str]] = []
        self.oom = oom

    def __call__(self, cmd, timeout_s, log_path, env):
        self.calls.append(cmd)
        if cmd[1].endswith("accelerate_peer.py"):
            if arg(cmd, "--batch-size") in self.oom:
                return bs.Outcome(1, OOM, 0.01)
            return bs.Outcome(0, ACCEL_OUT, 0.01)
        return bs.Outcome(0, FLEXGEN_OUT, 0.01)


def run_suite(out: Path, cases: dict, names: list[str], runner, **kw) -> bs.Suite:
    suite = bs.Suite(out, cases=cases, names=names, runner=runner, use_plan=False, commit="c0ffee",
                     flexgen_version="0.1.8", accelerate_version="accelerate-1.15.0+transformers-5.17.0",
                     dropper=lambda: True, probe=lambda: {"gpu": "NVIDIA H200", "ram_gib": 125.9, "cpu_count": 16,
                                                          "gpu_mem_gib": 139.8},
                     offload_root=out.parent / "offload", min_run_s=0.01, **kw)
    suite.run()
    return suite


def test_suite_runs_accelerate_beside_its_flexgen_peer(tmp_path):
    cases = {"f": Case("f", "opt-125m", 32, 8, 16, None, FlexGen(ALL_GPU, 4, est_s=0.2)),
             "a": Case("a", "opt-125m", 32, 8, 16, None, None, peer="f",
                       accelerate=Accelerate(8, gpu_weights_gib=4, batch_candidates=(4,), cut_gen_len=5, est_s=0.2))}
    runner = FakeRunner(oom=("8",))
    suite = run_suite(tmp_path / "out", cases, ["a"], runner)
    assert [(r["case"], r["system"]) for r in suite.records()] == [("f", "flexgen"), ("a", "accelerate")]
    r = suite.records()[-1]
    assert r["status"] == "ok" and r["batch"] == [4, 1] and [a["status"] for a in r["attempts"]] == ["no_fit", "ok"]
    assert r["version"] == "accelerate-1.15.0+transformers-5.17.0" and r["cut_gen_len"] == 5
    assert r["placement_gib"] == {"gpu": 8.652, "cpu": 47.179, "disk": 0.0} and r["total_throughput"] == 1.251
    assert r["settings_full"]["gpu_weights_gib"] == 4
    cmd = runner.calls[-1]
    assert arg(cmd, "--batch-size") == "4" and arg(cmd, "--cut-gen-len") == "5" and arg(cmd, "--gpu-cap-gib") == "16"
    assert run_suite(tmp_path / "out", cases, ["a"], runner).records() == suite.records()  # done: nothing reruns
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in bs.table(suite.records(), cases, ["a"])
            .splitlines()[2:]}
    assert f"{1.251 / 14.304:.2f}x" in rows[("a", "accelerate")] and "1.3 (cut 5)" in rows[("a", "accelerate")]
    assert "cpu 47.2" in rows[("a", "accelerate")] and ("f", "flexgen") in rows
    only_flexgen = run_suite(tmp_path / "o2", cases, ["a"], FakeRunner(), systems=("flexgen",))
    assert [r["system"] for r in only_flexgen.records()] == ["flexgen"]


# --- the tables ----------------------------------------------------------------------------------------

def ours(case: str, tput: float, batch: list[int], started: str, status: str = "ok", **kw) -> dict:
    """A record shaped like the suite's (copied from h200_2026-11-26_call7/runs.jsonl, trimmed)."""
    c = CASES[case]
    settings = dict(percent=list(c.ours.percent), gpu_batch_size=batch[0], num_gpu_batches=batch[1],
                    kv_policy=c.ours.kv_policy, cut_gen_len=c.ours.cut_gen_len, est_s=c.ours.est_s)
    return dict(case=case, system="ours", version="db090420d15a9895b168d0c777d74d470002da50-dirty",
                settings="5abe6ae688", commit="db090420d15a9895b168d0c777d74d470002da50-dirty", status=status,
                started=started, model=c.model, prompt_len=c.prompt_len, gen_len=c.gen_len,
                gpu_cap_gib=c.gpu_cap_gib, settings_full=settings, wall_s=295.1, batch_size=batch[0] * batch[1],
                prefill_s=20.4, decode_s=127.5, total_throughput=tput, peak_gpu_mem_gib=12.29, gpu="NVIDIA H200",
                batch=batch, rc=0, error=None, **kw)


def flexgen(case: str, tput: float, batch: list[int], started: str, cut: int | None) -> dict:
    c = CASES[case]
    return dict(case=case, system="flexgen", version="flexgen-0.1.8", settings="80529fa86c", commit="db09042-dirty",
                status="ok", started=started, model=c.model, prompt_len=c.prompt_len, gen_len=c.gen_len,
                gpu_cap_gib=c.gpu_cap_gib, settings_full=dict(percent=list(c.flexgen.percent)), wall_s=102.1,
                flexgen_version="0.1.8", cut_gen_len=cut, total_throughput=tput, projected=bool(cut), batch=batch,
                batch_size=batch[0] * batch[1], rc=0, error=None)


def write_folder(folder: Path, records: list[dict], gpu: str = "NVIDIA H200") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "runs.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    hardware = dict(gpu=gpu, gpu_mem_gib=139.8, ram_gib=125.87, cpu_count=16, torch="2.11.0+cu130")
    (folder / "summary.json").write_text(json.dumps(dict(hardware=hardware, commit="c0ffee", runs=records)))
    return folder


def cells(markdown: str) -> dict[str, list[str]]:
    """The first table of a markdown file: row label -> cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [line.split("|")[1:-1] for line in lines[start + 2:end]]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def canned_runs(tmp_path: Path) -> Path:
    """One H200 folder: ours, FlexGen, and an Accelerate run made by the suite itself (fake runner)."""
    run_suite(tmp_path / "h200", CASES, ["table-opt30b-cap16-512+32"], FakeRunner(oom=("16", "12")),
              systems=("accelerate",))
    return write_folder(tmp_path / "h200", [
        ours("opt30b-h2o-512+32", 83.05916692375625, [64, 6], "2026-11-26 03:05:15"),
        flexgen("opt30b-cap16-cpuattn", 14.304, [24, 2], "2026-11-26 03:10:10", cut=5),
        ours("opt6.7b-h2o-512+32", 544.1338362126219, [32, 1], "2026-11-26 03:11:52"),
        ours("opt6.7b-gpu-bmax", 2100.0, [256, 1], "2026-11-26 01:00:00"),  # older: the later run is shown
        ours("opt6.7b-gpu-bmax", 2056.38, [256, 1], "2026-11-26 04:00:00"),
        ours("opt6.7b-gpu-b32", 1529.0, [32, 1], "2026-11-26 04:10:00"),  # slower candidate of the same cell
        ours("table-opt6.7b-cap16-512+32", 0.0, [4, 1], "2026-11-26 05:00:00", status="no_fit"),
        ours("opt30b-h2o-512+512", 120.0, [64, 6], "2026-11-26 05:10:00"),  # its case decodes 16 steps
    ])


def test_tables_from_canned_runs(tmp_path):
    folder = canned_runs(tmp_path)
    paths = pt.write_tables([folder], tmp_path / "tables")
    assert [p.name for p in paths] == ["flexgen_table.md", "h2o_table.md", "tables.png"]
    flex = paths[0].read_text()
    t = cells(flex)
    assert t["this engine"] == ["2,056.4 (256, gpu)", "-"]
    assert t["this engine, H2O 20%"] == ["544.1 (32, gpu)†", "83.1 (384, cpu)"]  # † its 16 GiB cap, column: none
    assert t["this engine, 4-bit"] == t["this engine, HiP"] == t["FlexGen, 4-bit"] == ["-", "-"]
    assert t["FlexGen"] == ["-", "14.3 (48, cpu, cut 5)"]
    assert t["Accelerate"] == ["-", "1.3 (8, cpu, cut 5)"]  # batch 8 after 16 and 12 ran out of memory
    assert "Hardware: NVIDIA H200 (140 GiB), 126 GiB RAM, 16 cores" in flex and "db090420d1-dirty" in flex
    assert "accelerate-1.15.0+transformers-5.17.0" in flex and "flexgen-0.1.8" in flex
    assert "FlexGen `opt30b-cap16-cpuattn` (5 of 32 tokens)" in flex
    assert "Accelerate `table-opt30b-cap16-512+32` (5 of 32 tokens)" in flex
    assert "`opt6.7b-h2o-512+32` (16 GiB cap)" in flex and "25.26 (2, gpu)" in flex  # the published table
    h2o = paths[1].read_text()
    t = cells(h2o)
    assert list(t) == ["this engine, H2O 20%", "this engine, full cache", "FlexGen", "Accelerate"]
    assert t["this engine, H2O 20%"] == ["544.1 (32, gpu)", "-", "-", "83.1 (384, cpu)", "120.0 (384, cpu, cut 16)",
                                         "-"]
    assert t["this engine, full cache"] == ["no_fit", "-", "-", "-", "-", "-"]
    assert t["FlexGen"] == ["-", "-", "-", "14.3 (48, cpu, cut 5)", "-", "-"]
    assert t["Accelerate"] == ["-", "-", "-", "1.3 (8, cpu, cut 5)", "-", "-"]
    assert "†" not in h2o and "`opt30b-h2o-512+512` (16 of 512 tokens)" in h2o
    png = paths[2].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_tables_from_two_machines_name_the_gpu(tmp_path, capsys):
    h200 = canned_runs(tmp_path)
    h100 = write_folder(tmp_path / "h100", [flexgen("opt6.7b-gpu-b32", 799.0, [32, 1], "2026-11-24 10:00:00", None)],
                        gpu="NVIDIA H100 80GB HBM3")
    assert pt.main(["--runs", str(h200), str(h100), "--out", str(tmp_path / "t")]) == 0
    flex = (tmp_path / "t" / "flexgen_table.md").read_text()
    assert cells(flex)["FlexGen"] == ["799.0 (32, gpu) [H100 80GB HBM3]", "14.3 (48, cpu, cut 5) [H200]"]
    assert "different machines" in flex and "wrote" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        pt.main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "t2")])


def test_every_table_case_fills_a_cell():
    pt.check_tables()
    named = {case for t in pt.TABLES for row in t.rows for cases in row.cells for case in cases}
    assert {n for n in CASES if n.startswith("table-")} <= named


# --- the device calls ----------------------------------------------------------------------------------

def suite_jobs(cases: list[str], systems: tuple[str, ...]) -> set[tuple[str, str]]:
    s = bs.Suite(Path("/nonexistent"), names=cases, systems=systems, flexgen_version="-", accelerate_version="-")
    return set(s.jobs())


@pytest.mark.parametrize("budget", [540.0, 300.0])
def test_print_commands_split_by_budget(budget):
    calls, long = pt.plan_calls([], budget)
    wanted = {case for t in pt.TABLES for row in t.rows for cases in row.cells for case in cases}
    planned: list = [j for c in calls + long for j in c["jobs"]]
    assert len(planned) == len(set(planned)) and set(planned) == suite_jobs(sorted(wanted), bs.SYSTEMS)
    ran: set = set()
    for call in calls:  # each call fits and runs exactly its jobs, besides those earlier calls ran
        assert call["seconds"] <= budget - 15
        assert suite_jobs(call["cases"], call["systems"]) - ran == set(call["jobs"])
        ran |= set(call["jobs"])
    assert all(u["seconds"] > budget - 15 and len(u["jobs"]) == 1 for u in long)
    assert bool(long) == (budget == 300.0)  # OPT-30B runs guessed at 300 s fit 540 s calls, not 300 s ones


def test_print_commands_skip_done_runs_and_use_measured_times(tmp_path, capsys):
    done = [dict(case=n, system="ours", status="ok", wall_s=1.0) for n in CASES if CASES[n].ours] + \
           [dict(case=n, system="flexgen", status="ok", wall_s=1.0) for n in CASES if CASES[n].flexgen]
    slow = dict(case="table-opt6.7b-gpu", system="accelerate", status="budget", wall_s=400.0)  # cut by a budget
    calls, long = pt.plan_calls(done + [slow], 540.0)
    assert all(c["systems"] == ("accelerate",) for c in calls) and not long
    jobs = {j: c for c in calls for j in c["jobs"]}
    assert set(jobs) == {(n, "accelerate") for n in CASES if CASES[n].accelerate}
    assert jobs[("table-opt6.7b-gpu", "accelerate")]["seconds"] == pytest.approx(500.0)  # 1.25 x 400 s
    folder = write_folder(tmp_path / "runs", done)
    assert pt.main(["--print-commands", "--runs", str(folder), "--suite-out", "experiments/results/t"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("PYTHONPATH")]
    assert len(lines) == len(pt.plan_calls(done, 540.0)[0]) >= 3  # 1,270 s of guesses
    named = [n for line in lines for n in line.split(" --cases ")[1].split()]
    assert sorted(named) == sorted(n for n in CASES if CASES[n].accelerate)
    assert all("--out experiments/results/t --copy-to $OUT --budget-s 540 --systems accelerate --cases" in line
               for line in lines)
    everything = [dict(case=j[0], system=j[1], status="ok") for j in suite_jobs(list(CASES), bs.SYSTEMS)]
    assert pt.print_commands(everything, 540.0, "x").startswith("# every cell")
