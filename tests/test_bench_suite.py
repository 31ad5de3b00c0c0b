"""The device benchmark suite without a GPU: the commands it builds (checked against our engine's
own parser and FlexGen 0.1.8's flag list), the report parsers on canned outputs, resumability,
the budget stop, batch fallbacks, the process runner's timeout and the carried wheels."""
from __future__ import annotations

import json
import re
import sys
import time
import zipfile
from pathlib import Path

import pytest

from experiments import bench_suite as bs
from experiments.cases import ALL_GPU, CASES, Case, FlexGen, Ours, select, validate

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"

# Copied from /work/shared/baselines/flexgen_opt30b_cap16_bs48_512+32.log and the device's runs.log:
# FlexGen prints a first size line (comma-separated), its devices, then the report.
FLEXGEN_OUT = """\
<run_flexgen>: args.model: facebook/opt-30b
model size: 55.803 GB, cache size: 33.469 GB, hidden size (prefill): 0.349 GB
init weight...
warmup - generate
benchmark - generate
TorchDevice: cuda:0
  cur_mem: 4.6572 GB,  peak_mem: 8.9974 GB
TorchDevice: cpu
  cur_mem: 51.8782 GB,  peak_mem: 0.0000 GB
model size: 55.803 GB\tcache size: 33.469 GB\thidden size (p): 0.349 GB
peak gpu mem: 8.997 GB\tprojected: True
prefill latency: 6.125 s\tprefill throughput: 4012.327 token/s
decode latency: 94.502 s\tdecode throughput: 15.746 token/s
total latency: 100.627 s\ttotal throughput: 15.264 token/s
/tmp/site/flexgen/utils.py:132: UserWarning: TypedStorage is deprecated.
"""

OURS_JSON = {  # the fields offload_engine/cli/run.py writes that the suite reads
    "model": "opt-30b",
    "metrics": {"batch_size": 48, "prompt_len": 512, "gen_len": 32, "prefill_s": 3.005, "decode_s": 46.208,
                "total_s": 49.213, "prefill_throughput": 8178.2, "decode_throughput": 32.2,
                "total_throughput": 31.211},
    "peak_memory": {"peak_cpu_rss_gib": 80.6, "peak_gpu_mem_gib": 15.27},
    "planned_gib": {"gpu": 15.3, "cpu": 79.17, "disk": 0.0},
    "decode_step_busy_s": {"act_io": 0.0069, "compute": 0.8716, "cpu_attention": 1.3054, "weight_io": 0.8974},
    "hardware": {"gpu": "NVIDIA H100 80GB HBM3"}, "commit": "abc",
}


def arg(cmd: list[str], flag: str, n: int = 1) -> list[str]:
    i = cmd.index(flag)
    return cmd[i + 1:i + 1 + n]


# --- the case table and the commands -------------------------------------------------------------

def test_table_is_valid_and_peers_share_the_workload():
    validate(CASES)
    assert {"opt6.7b-gpu-b32", "opt30b-cap16-cpuattn", "opt30b-h2o-1024+1024", "opt6.7b-compress-b72"} <= set(CASES)
    for case in CASES.values():
        if case.peer_name() is None:  # this engine alone (Llama-family models FlexGen cannot run)
            assert case.model.startswith("llama")
            continue
        peer = CASES[case.peer_name()]
        assert peer.flexgen is not None and (peer.model, peer.prompt_len, peer.gen_len) == \
            (case.model, case.prompt_len, case.gen_len)
        if case.ours and case.ours.kv_policy == "h2o":
            assert case.gpu_cap_gib == 16 and case.ours.hh_ratio + case.ours.recent_ratio == pytest.approx(0.2)
    assert select(["opt30b-h2o-*"]) == ["opt30b-h2o-512+32", "opt30b-h2o-512+512", "opt30b-h2o-1024+1024"]
    with pytest.raises(ValueError, match="no case matches"):
        select(["nope"])


@pytest.mark.parametrize("bad, message", [
    (dict(peer="missing"), "not a case with FlexGen flags"),
    (dict(flexgen=FlexGen((100, 0, 100, 0, 50, 50), 4)), "activations 100% on one tier"),
    (dict(flexgen=FlexGen((100, 0, 50, 50, 100, 0), 4, compress_cache=True)), "cannot be split"),
    (dict(flexgen=FlexGen((50.5, 49.5, 100, 0, 100, 0), 4)), "whole percentages"),
    (dict(ours=Ours(ALL_GPU, 4, batch_candidates=((8, 1),))), "descending"),
    (dict(ours=Ours((60, 50, 100, 0, 100, 0), 4)), "outside 0..100"),
])
def test_validate_refuses_bad_cases(bad, message):
    fields = dict(name="x", model="opt-125m", prompt_len=32, gen_len=8, gpu_cap_gib=None,
                  ours=Ours(ALL_GPU, 4), flexgen=FlexGen(ALL_GPU, 4))
    with pytest.raises(ValueError, match=message):
        validate({"x": Case(**{**fields, **bad})})


def test_ours_commands_have_the_flags_and_our_parser_accepts_every_one(tmp_path):
    from offload_engine.cli import build_parser
    from offload_engine.cli.options import policy_from_args

    cmd = bs.ours_command(CASES["opt30b-cap16-cpuattn"], (24, 2), tmp_path / "r.json", tmp_path / "off")
    assert cmd[1:5] == ["-m", "offload_engine", "run", "--model"] and arg(cmd, "--model") == ["opt-30b"]
    assert arg(cmd, "--percent", 6) == ["20", "80", "0", "100", "0", "100"]
    assert arg(cmd, "--gpu-batch-size") == ["24"] and arg(cmd, "--num-gpu-batches") == ["2"]
    assert arg(cmd, "--gpu-mem") == ["16"] and arg(cmd, "--json") == [str(tmp_path / "r.json")]
    assert {"--cpu-cache-compute", "--profile", "--quiet"} <= set(cmd) and "--kv-policy" not in cmd
    h2o = bs.ours_command(CASES["opt30b-h2o-1024+1024"], (16, 4), tmp_path / "r.json", tmp_path / "off")
    assert arg(h2o, "--kv-policy", 5) == ["h2o", "--hh-ratio", "0.1", "--recent-ratio", "0.1"]
    assert arg(h2o, "--prompt-len") == ["1024"] and arg(h2o, "--gen-len") == ["1024"]
    gpu = bs.ours_command(CASES["opt6.7b-compress-b72"], (72, 1), tmp_path / "r.json", tmp_path / "off")
    assert {"--compress-weight", "--compress-cache"} <= set(gpu) and "--gpu-mem" not in gpu
    assert Ours(ALL_GPU, 4, cuda_graphs=False).flags((4, 1))[-1] == "--no-cuda-graphs"
    for case in CASES.values():  # every candidate of every case parses, and means what the table says
        for batch in case.ours.batches() if case.ours else ():
            c = bs.ours_command(case, batch, tmp_path / "r.json", tmp_path / "off")
            args = build_parser().parse_args(c[c.index("run"):])
            policy = policy_from_args(args)
            assert (policy.gpu_batch_size, policy.num_gpu_batches) == batch
            assert list(policy.percent) == list(case.ours.percent) and args.kv_policy == case.ours.kv_policy
            assert policy.cpu_cache_compute == case.ours.cpu_cache_compute
            assert (policy.compress_cache is not None) == case.ours.compress_cache


def _flexgen_flags() -> set[str]:
    """The flags of FlexGen 0.1.8's add_parser_arguments, read from the carried wheel's source."""
    wheel = next(WHEELS.glob("flexgen-0.1.8-*.whl"), None)
    if wheel is None:
        pytest.skip("the flexgen wheel is not in .whl/ (git-ignored; bench_suite.py's docstring says how to fill it)")
    with zipfile.ZipFile(wheel) as z:
        source = z.read("flexgen/flex_opt.py").decode()
    body = source[source.index("def add_parser_arguments"):]
    return set(re.findall(r'add_argument\(\s*"(--[a-z-]+)"', body))


def test_flexgen_commands_cap_and_cut(tmp_path):
    case = CASES["opt30b-cap16-cpuattn"]
    cmd = bs.flexgen_command(case, (24, 2), bs.flexgen_cut(case, 5), tmp_path / "off")
    assert cmd[1].endswith("experiments/flexgen_peer.py")
    assert arg(cmd, "--model") == ["facebook/opt-30b"] and arg(cmd, "--path") == ["_DUMMY_"]
    assert arg(cmd, "--cut-gen-len") == ["5"] and arg(cmd, "--gpu-cap-gib") == ["16"]
    assert arg(cmd, "--percent", 6) == ["20", "80", "0", "100", "0", "100"] and "--cpu-cache-compute" in cmd
    assert bs.flexgen_cut(case, 0) is None  # --flexgen-cut-gen-len 0: decode every step
    small = CASES["opt6.7b-gpu-b32"]
    cmd = bs.flexgen_command(small, (32, 1), bs.flexgen_cut(small, 5), tmp_path / "off")
    assert "--cut-gen-len" not in cmd and "--gpu-cap-gib" not in cmd
    assert FlexGen(ALL_GPU, 4, overlap=False).flags((4, 1))[-2:] == ["--overlap", "False"]


def test_flexgen_commands_use_only_flexgens_flags(tmp_path):
    known = _flexgen_flags() | {"--gpu-cap-gib"}  # the latter is flexgen_peer.py's own
    assert {"--percent", "--cut-gen-len", "--compress-cache", "--offload-dir", "--log-file"} <= known
    for case in CASES.values():
        for batch in case.flexgen.batches() if case.flexgen else ():
            flags = {a for a in bs.flexgen_command(case, batch, 5, tmp_path / "off") if a.startswith("--")}
            assert flags <= known, flags - known


def test_dry_run_prints_commands_plans_and_shares_the_peer_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert bs.main(["--out", str(out), "--dry-run", "--cases", "opt30b-cap16-cpuattn", "opt30b-h2o-512+32",
                    "opt6.7b-disk-weights"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    assert text.count("## flexgen opt30b-cap16-cpuattn") == 1 and "## ours opt30b-h2o-512+32" in text
    assert "--cut-gen-len 5" in text and "--gpu-mem 16" in text and "--kv-policy h2o" in text
    plan = re.search(r"## ours opt30b-cap16-cpuattn.*?# planned GiB: gpu ([0-9.]+) \(2 slots: ([0-9.]+)\), "
                     r"cpu ([0-9.]+)", text, re.S)
    gpu, gpu_min, cpu = map(float, plan.groups())  # the README's OPT-30B plan: 15.30 GiB GPU, 79.17 CPU
    assert 14 < gpu_min <= gpu < 16 and 75 < cpu < 85
    assert "$ sync; echo 1 > /proc/sys/vm/drop_caches" in text  # before the disk case only
    assert text.index("drop_caches") > text.index("## ours opt6.7b-disk-weights")


# --- parsers and the table -------------------------------------------------------------------------

def test_parse_flexgen_report():
    r = bs.parse_report(FLEXGEN_OUT)
    assert r == {"model_gib": 55.803, "cache_gib": 33.469, "hidden_gib": 0.349, "peak_gpu_mem_gib": 8.997,
                 "prefill_s": 6.125, "prefill_throughput": 4012.327, "decode_s": 94.502, "decode_throughput": 15.746,
                 "total_s": 100.627, "total_throughput": 15.264, "projected": True}
    assert bs.parse_report("Traceback ...\nRuntimeError: boom") == {}


def test_parse_ours_and_table_ratio():
    ours = bs.parse_ours(OURS_JSON)
    assert ours["total_throughput"] == 31.211 and ours["peak_gpu_mem_gib"] == 15.27
    assert ours["decode_step_busy_s"]["weight_io"] == 0.8974 and ours["gpu"] == "NVIDIA H100 80GB HBM3"
    flex = dict(bs.parse_report(FLEXGEN_OUT), case="opt30b-cap16-cpuattn", system="flexgen", status="ok",
                batch=[24, 2], cut_gen_len=5)
    records = [dict(ours, case="opt30b-h2o-512+32", system="ours", status="ok", batch=[64, 6]), flex,
               dict(case="opt30b-cap16-cpuattn", system="ours", status="no_fit")]
    text = bs.table(records, CASES, ["opt30b-h2o-512+32", "opt30b-cap16-cpuattn"])
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()[2:]}
    assert f"{31.211 / 15.264:.2f}x" in rows[("opt30b-h2o-512+32", "ours")]
    assert "w 897" in rows[("opt30b-h2o-512+32", "ours")] and "cpu-attn 1305" in rows[("opt30b-h2o-512+32", "ours")]
    assert "15.3 (cut 5)" in rows[("opt30b-cap16-cpuattn", "flexgen")]
    assert "no_fit" in rows[("opt30b-cap16-cpuattn", "ours")]


# --- the suite with a fake runner --------------------------------------------------------------------

def tiny_cases(n: int, est_s: float = 0.2) -> dict[str, Case]:
    return {f"c{i}": Case(f"c{i}", "opt-125m", 32, 8, None, Ours(ALL_GPU, 8, batch_candidates=((4, 1),), est_s=est_s),
                          FlexGen(ALL_GPU, 8, batch_candidates=((4, 1),), est_s=est_s)) for i in range(n)}


class FakeRunner:
    """Writes our JSON where --json says and prints FlexGen's report; `refuse` batches do not fit."""

    def __init__(self, sleep_s: float = 0.0, refuse: tuple[str, ...] = ()):
        self.calls: list[list[str]] = []
        self.sleep_s, self.refuse = sleep_s, refuse

    def __call__(self, cmd, timeout_s, log_path, env):
        self.calls.append(cmd)
        time.sleep(self.sleep_s)
        if arg(cmd, "--gpu-batch-size")[0] in self.refuse:
            text = ("error: policy does not fit: the GPU tier needs 17.2 GiB" if "offload_engine" in cmd
                    else "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
            return bs.Outcome(2 if "offload_engine" in cmd else 1, text, self.sleep_s)
        if "offload_engine" in cmd:
            Path(arg(cmd, "--json")[0]).write_text(json.dumps(OURS_JSON))
            return bs.Outcome(0, "results written", self.sleep_s)
        return bs.Outcome(0, FLEXGEN_OUT, self.sleep_s)


def make_suite(tmp_path, cases, runner, **kw) -> bs.Suite:
    return bs.Suite(tmp_path / "out", cases=cases, runner=runner, use_plan=False, commit="c0ffee",
                    flexgen_version="0.1.8", dropper=lambda: True, probe=lambda: {"gpu": "fake"},
                    offload_root=tmp_path / "offload", min_run_s=0.01, **kw)


def test_resume_skips_a_finished_run(tmp_path):
    runner = FakeRunner()
    suite = make_suite(tmp_path, tiny_cases(2), runner)
    suite.out.mkdir()
    finished = dict(suite.key("c0", "ours"), status="ok", wall_s=1.0, total_throughput=1.0)
    cut = dict(suite.key("c1", "ours"), status="budget", wall_s=1.0)  # killed by the budget: runs again
    suite.runs_path.write_text(json.dumps(finished) + "\n" + json.dumps(cut) + "\n{\"cut short")
    written = suite.run()
    assert [(r["case"], r["system"]) for r in written] == [("c0", "flexgen"), ("c1", "ours"), ("c1", "flexgen")]
    assert all(r["status"] == "ok" and r["batch"] == [8, 1] for r in written)
    assert [Path(arg(c, "--json")[0]).name for c in runner.calls if "offload_engine" in c] == [".ours-c1.json"]
    summary = json.loads((suite.out / "summary.json").read_text())
    assert summary["commit"] == "c0ffee" and summary["hardware"] == {"gpu": "fake"} and len(summary["runs"]) == 5
    assert make_suite(tmp_path, tiny_cases(2), runner).run() == []  # all done now
    assert len(make_suite(tmp_path, tiny_cases(2), runner, force=True).run()) == 4


def test_timeouts_lock_and_wait(tmp_path, capsys):
    def hang(cmd, timeout_s, log_path, env):
        return bs.Outcome(-15, "killed", 0.1, timed_out=True)

    cases = {"c0": tiny_cases(1)["c0"]}
    cut = make_suite(tmp_path, cases, hang, systems=("ours",)).run()  # timeout = what was left of the budget
    capped = make_suite(tmp_path, cases, hang, systems=("ours",), run_timeout_s=5.0).run()  # its own cap
    assert [r["status"] for r in cut + capped] == ["budget", "timeout"]  # the first runs again, the second not
    assert make_suite(tmp_path, cases, hang, systems=("ours",)).run() == []
    lock = tmp_path / "out" / ".suite.lock"
    lock.write_text(str(__import__("os").getpid()))  # a live owner: a second suite must not write
    with pytest.raises(SystemExit, match="another suite"):
        make_suite(tmp_path, cases, hang, force=True).run()
    assert not bs.wait(tmp_path / "out", 0.2, tmp_path / "copy") and (tmp_path / "copy" / "runs.jsonl").exists()
    lock.write_text("999999999")  # a dead owner (killed suite): ignored
    assert bs.wait(tmp_path / "out", 5.0, None)
    assert bs.main(["--out", str(tmp_path / "out"), "--dry-run", "--cases", "opt6.7b-gpu-b32"]) == 0


def test_batch_candidates_fall_back_until_one_fits(tmp_path):
    runner = FakeRunner(refuse=("8",))
    written = make_suite(tmp_path, tiny_cases(1), runner).run()
    for r in written:
        assert r["status"] == "ok" and r["batch"] == [4, 1] and [a["status"] for a in r["attempts"]] == ["no_fit", "ok"]
    assert [arg(c, "--gpu-batch-size")[0] for c in runner.calls] == ["8", "4", "8", "4"]
    written = make_suite(tmp_path, tiny_cases(1), FakeRunner(refuse=("8", "4")), force=True).run()
    assert [r["status"] for r in written] == ["no_fit", "no_fit"]


def test_budget_stops_starting_runs(tmp_path):
    runner = FakeRunner(sleep_s=0.25)
    suite = make_suite(tmp_path, tiny_cases(4, est_s=0.25), runner, budget_s=1.0, reserve_s=0.0)
    t0 = time.monotonic()
    written = suite.run()
    elapsed = time.monotonic() - t0
    assert 2 <= len(written) <= 4 and elapsed < 1.0 + 0.2  # never started a run it could not finish
    assert len(suite.skipped) == 8 - len(written) and "s left" in suite.skipped[0]
    assert "skipped:" in (suite.out / "runs.log").read_text()
    # the measured wall time replaces the guess: a long measured run is not started with 0.5 s left
    long = dict(suite.key("c3", "flexgen"), status="ok", wall_s=100.0)
    with open(suite.runs_path, "a") as f:
        f.write(json.dumps(long) + "\n")
    assert suite.estimate("c3", "flexgen", suite.records()) == pytest.approx(110.0)


# --- the process runner and the wheels ------------------------------------------------------------

def test_run_process_streams_output_and_kills_on_timeout(tmp_path):
    log = tmp_path / "runs.log"
    o = bs.run_process([sys.executable, "-c", "print('hello')"], 30, log, {"PATH": "/usr/bin:/bin"})
    assert (o.rc, o.text.strip(), o.timed_out) == (0, "hello", False)
    code = "import time; print('started', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    o = bs.run_process([sys.executable, "-c", code], 1.0, log, {"PATH": "/usr/bin:/bin"})
    assert o.timed_out and o.rc != 0 and "started" in o.text and time.monotonic() - t0 < 20
    assert log.read_text().count("started") == 1
    assert bs.does_not_fit(bs.Outcome(2, "error: policy does not fit: the CPU tier needs", 1.0))
    assert not bs.does_not_fit(bs.Outcome(124, "", 1.0, timed_out=True))


def test_carried_wheels():
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        pytest.skip(".whl/ is empty here (git-ignored; bench_suite.py's docstring says how to fill it)")
    names = [w.name.split("-")[0].lower() for w in wheels]
    assert len(names) == len(set(names)), "two versions of one package stop the whole install"
    assert {"flexgen", "gguf"} <= set(names)
    assert not set(names) & {"torch", "numpy", "transformers", "triton", "tokenizers", "safetensors"}
    assert sum(w.stat().st_size for w in wheels) < 20 * 2**20
    with zipfile.ZipFile(next(w for w in wheels if w.name.startswith("flexgen-0.1.8"))) as z:
        sources = [n for n in z.namelist() if n.startswith("flexgen/") and n.endswith(".py")]
        assert not any(re.search(r"^\s*(import|from) pulp", z.read(n).decode(), re.M) for n in sources), \
            "flexgen itself imports pulp: carry the pulp wheel"


def test_table_compares_accelerate_with_the_flexgen_peer():
    records = [dict(case="opt30b-cap16-cpuattn", system="flexgen", status="ok", batch=[24, 2], total_throughput=12.0,
                    prefill_s=3, decode_s=50),
               dict(case="table-opt30b-cap16-512+32", system="accelerate", status="ok", batch=[16],
                    total_throughput=3.0, prefill_s=5, decode_s=40, peak_gpu_mem_gib=15.1,
                    placement_gib={"gpu": 4, "cpu": 52, "disk": 0}, cut_gen_len=5),
               dict(case="table-opt6.7b-gpu", system="accelerate", status="oom", batch=[256])]
    text = bs.table(records, CASES, ["table-opt30b-cap16-512+32", "table-opt6.7b-gpu"])
    rows = text.splitlines()
    assert rows[2].startswith("| opt30b-cap16-cpuattn | flexgen |")
    assert "| table-opt30b-cap16-512+32 | accelerate | 16 |" in text and "3.0 (cut 5) | 0.25x | 15.10 |" in text
    assert "weights GiB: gpu 4.0, cpu 52.0 |" in text and "| table-opt6.7b-gpu | accelerate | 256 | | | oom |" in text
