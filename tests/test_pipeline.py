"""Pipeline parallelism on the CPU (gloo): 2 and 3 stage processes give the single-process
engine's logits and greedy tokens, whatever each stage's placement, compression or KV policy;
the split is balanced; a stage that dies or cannot start ends the run, naming the stage."""
from __future__ import annotations

import itertools
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.cli import main
from offload_engine.engine import Engine, EngineOptions, StageSlice
from offload_engine.errors import EngineError
from offload_engine.io.tiers import Tier
from offload_engine.pipeline import PipelineJob, balanced_split, run_pipeline
from offload_engine.sampling import GenerationConfig
from offload_engine.policies import Compression, H2OConfig, HiPConfig, KVSettings
from offload_engine.policies.memory import Workload, plan_memory
from offload_engine.policies.placement import Policy

from conftest import random_prompts, rel_err, save_checkpoint, tiny_hf_llama, tiny_hf_opt

PROMPT, GEN = 12, 5
ON_GPU, ON_CPU, CPU_ATTN, ON_DISK = (100, 0, 100, 0, 100, 0), (0, 100, 0, 100, 0, 100), "cpu-attn", (0, 0, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"opt": save_checkpoint(tiny_hf_opt(seed=11), tmp_path_factory.mktemp("opt"), "safetensors"),
            "llama": save_checkpoint(tiny_hf_llama(seed=12), tmp_path_factory.mktemp("llama"), "safetensors")}


def policy(placement, nb: int, **kw) -> Policy:
    if placement == CPU_ATTN:
        return Policy.from_percent((100, 0, 0, 100, 100, 0), gpu_batch_size=2, num_gpu_batches=nb,
                                   cpu_cache_compute=True, **kw)
    return Policy.from_percent(placement, gpu_batch_size=2, num_gpu_batches=nb, **kw)


def single_process(folder, tmp_path, nb_total: int, ids, mask, device="cpu", **kw):
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path / "single", progress=False, dtype=torch.float32,
                         device=device)
    with Engine(from_hf_config(folder), policy(ON_GPU, nb_total, **kw), Workload(PROMPT, GEN), opts) as engine:
        return engine.generate(ids, mask, GenerationConfig(max_new_tokens=GEN), collect_logits=True)


def pipeline(folder, tmp_path, placements, blocks: int, nb: int, ids, mask, splits=None, device="cpu",
             **kw) -> dict:
    cfg = from_hf_config(folder)
    n = len(placements)
    if splits is None:
        from offload_engine.pipeline.split import stage_split
        splits = stage_split(cfg, policy(ON_GPU, nb), Workload(PROMPT, GEN), n)[0]
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path / "stages", progress=False, dtype=torch.float32,
                         device=device)
    job = PipelineJob(cfg, [policy(p, nb, **kw) for p in placements], splits, blocks, Workload(PROMPT, GEN), opts,
                      ids, mask, GenerationConfig(max_new_tokens=GEN), warmup=False, collect_logits=True)
    return run_pipeline(job)


def assert_same(result: dict, reference) -> None:
    assert torch.equal(result["tokens"], reference.tokens)
    for got, want in zip(result["step_logits"], reference.step_logits, strict=True):
        assert rel_err(got, want) < 1e-5


CASES = {  # stages' placements, micro-batches, gpu batches per block, KV and compression settings
    "opt 2 stages, weights and cache on the CPU tier in stage 1": ("opt", [ON_GPU, ON_CPU], 2, 2, {}),
    "opt 3 stages, CPU attention and disk": ("opt", [CPU_ATTN, ON_DISK, ON_GPU], 3, 1, {}),
    "opt 3 stages, one micro-batch in flight": ("opt", [ON_GPU, ON_CPU, ON_GPU], 1, 2, {}),
    "llama 2 stages, CPU attention then disk": ("llama", [CPU_ATTN, ON_DISK], 2, 1, {}),
    "llama 3 stages, H2O evicting on every tier": (
        "llama", [ON_CPU, CPU_ATTN, ON_GPU], 3, 1, dict(kv=KVSettings("h2o", H2OConfig(hh_size=3, recent_size=3)))),
    "opt 2 stages, 4-bit weights and cache": (
        "opt", [ON_GPU, ON_CPU], 2, 1, dict(compress_weight=Compression(4, 16), compress_cache=Compression(4, 8))),
    "llama 2 stages, HiP with dense first layers": (
        "llama", [ON_GPU, ON_GPU], 2, 1,
        dict(kv=KVSettings("hip", hip=HiPConfig(k=4, block_size_q=2, block_size_k=2, sink=2, window=2, dense_layers=2)))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_the_single_process_engine(checkpoints, tmp_path, case):
    family, placements, blocks, nb, kw = CASES[case]
    ids, mask = random_prompts(2 * nb * blocks, PROMPT, seed=len(case))
    got = pipeline(checkpoints[family], tmp_path, placements, blocks, nb, ids, mask, **kw)
    want = single_process(checkpoints[family], tmp_path, nb * blocks, ids, mask, **kw)
    assert_same(got, want)
    stages = got["stages"]
    assert [s["stage"] for s in stages] == list(range(len(placements)))
    assert [s["percent"] for s in stages] == [list(policy(p, nb).percent) for p in placements]
    assert stages[0]["layers"][0] == 0 and all(a["layers"][1] == b["layers"][0] for a, b in zip(stages, stages[1:]))
    assert all(s["sent_bytes"] > 0 and s["wall_s"] >= s["busy_s"] > 0 for s in stages)
    assert not (tmp_path / "stages").exists()  # every stage's offload files are gone


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("family, placements", [("opt", [ON_CPU, CPU_ATTN]), ("llama", [CPU_ATTN, ON_DISK]),
                                                ("opt", [ON_GPU, ON_GPU])])
def test_pipeline_on_two_gpus_matches_one_gpu(checkpoints, tmp_path, family, placements):
    """One stage per GPU, each offloading to its own share of the host, hidden states and tokens
    through pinned host memory: the one-GPU engine's tokens and logits (fp32 on GPUs of one kind)."""
    ids, mask = random_prompts(2 * 2 * 2, PROMPT, seed=5)
    got = pipeline(checkpoints[family], tmp_path, placements, 2, 2, ids, mask, device="cuda")
    want = single_process(checkpoints[family], tmp_path, 2 * 2, ids, mask, device="cuda")
    assert_same(got, want)
    assert all(s["sent_bytes"] > 0 for s in got["stages"])


def test_stage_engine_keeps_global_layer_settings_and_plans_its_blocks(checkpoints, tmp_path):
    """A stage's engine: HiP's dense layers counted over the whole model, KV for every block in
    flight (allocated as planned), weights of other stages neither loaded nor refused."""
    folder = checkpoints["llama"]
    cfg = from_hf_config(folder)
    kv = KVSettings("hip", hip=HiPConfig(k=4, block_size_q=2, block_size_k=2, sink=2, window=2, dense_layers=2))
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32, device="cpu")
    slice_ = StageSlice(range(3, 8), blocks=3)
    with Engine(cfg, Policy(gpu_batch_size=2, kv=kv), Workload(PROMPT, GEN), opts, stage=slice_) as engine:
        assert [layer.name for layer in engine.layers] == ["attn1", "mlp1", "attn2", "mlp2", "lm_head"]
        assert engine.kv.policy.dense == {0}  # attn1: the model's 2nd attention layer; attn2 is sparse
        assert set(engine.weights.homes) == {s.key for layer in engine.layers for s in layer.weight_specs()}
    p = Policy.from_percent((100, 0, 50, 50, 100, 0), gpu_batch_size=2, num_gpu_batches=2)
    with Engine(cfg, p, Workload(PROMPT, GEN), opts, stage=slice_) as engine:
        assert engine.plan.kv_split.count == 2 * 2 * 3 and len(engine.states) == 6
        assert len(engine.kv.homes) == 12 and {t for t, _, _ in engine.kv.homes.values()} == {Tier.GPU, Tier.CPU}
        allocated = engine.allocated_bytes()
        for tier in (Tier.GPU, Tier.CPU):
            assert allocated[tier] == engine.plan.persistent_bytes(tier)
        # Working memory: one block's received hidden states and one block's outputs in flight.
        alone = plan_memory(engine.layers, p, Workload(PROMPT, GEN), torch.float32, cfg.hidden_size,
                            engine.plan.weight_slots, kv_blocks=3)
        act_item = 2 * PROMPT * cfg.hidden_size * 4
        assert engine.plan.tiers[Tier.GPU].working - alone.tiers[Tier.GPU].working == 2 * 2 * act_item


def brute_force(costs, n):
    """The least largest stage cost over every contiguous split."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), n - 1):
        bounds = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_split_is_optimal_balanced_and_deterministic():
    rng = random.Random(5)
    for _ in range(200):
        costs = [rng.randint(1, 100) for _ in range(rng.randint(2, 9))]
        n = rng.randint(1, len(costs))
        split = balanced_split(costs, n)
        stage_costs = [sum(costs[r.start:r.stop]) for r in split]
        assert [i for r in split for i in r] == list(range(len(costs))) and all(len(r) for r in split)
        assert max(stage_costs) == brute_force(costs, n)
        assert max(stage_costs) <= sum(costs) / n + max(costs)  # balanced within one layer's cost
        assert balanced_split(costs, n) == split
    # Among equally bottlenecked splits the most even one: [4 | 1 1 | 4] rather than [4 1 | 1 | 4].
    assert balanced_split([4, 1, 1, 4], 3) == [range(0, 1), range(1, 3), range(3, 4)]
    with pytest.raises(EngineError, match="at least one layer"):
        balanced_split([1, 2], 3)


def kill_stage_1(stage: int, step: int) -> None:
    if stage == 1 and step == 2:
        os.kill(os.getpid(), signal.SIGKILL)


def run_killed_pipeline(folder: str, offload: str) -> None:
    """Three stages of which stage 1 is killed at its third step."""
    ids, mask = random_prompts(4, PROMPT, seed=1)
    opts = EngineOptions(checkpoint=Path(folder), offload_dir=Path(offload), progress=False, dtype=torch.float32,
                         device="cpu")
    job = PipelineJob(from_hf_config(Path(folder)), [policy(ON_GPU, 1), policy(ON_DISK, 1), policy(ON_GPU, 1)],
                      [range(0, 3), range(3, 5), range(5, 8)], 2, Workload(PROMPT, GEN), opts, ids, mask,
                      GenerationConfig(max_new_tokens=GEN), warmup=False, on_step=kill_stage_1)
    run_pipeline(job)


KILLED_RUN = """
import sys
from offload_engine.errors import EngineError
from test_pipeline import run_killed_pipeline
try:
    run_killed_pipeline(sys.argv[1], sys.argv[2])
except EngineError as e:
    print(f"error: {e}", file=sys.stderr)
"""


def test_a_killed_stage_ends_the_run_naming_it(checkpoints, tmp_path):
    """In a process of its own, as the command line runs it: its stderr is the one line naming the
    stage, without the launcher's log lines or the resource tracker's warnings at exit."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                    os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(checkpoints["opt"]), str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=180)
    assert time.perf_counter() - t0 < 90
    assert done.stderr.splitlines() == ["error: pipeline failed: stage 1 of 3 (layers 3-4): the process was killed "
                                        "by SIGKILL."], done.stderr
    assert not (tmp_path / "o").exists()  # the killed stage's disk-tier files too


def run_cli(*args):
    return main(["run", "--quiet", "--model", "opt-125m", "--prompt-len", "8", "--gen-len", "3", "--device", "cpu",
                 *args])


def test_cli_pipeline_records_the_split_and_stage_times(tmp_path, capsys):
    out = tmp_path / "r.json"
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    assert run_cli("--pipeline", "3", "--micro-batches", "2", "--gpu-batch-size", "2", "--stage-percent", "2",
                   "0", "100", "100", "0", "100", "0", "--offload-dir", str(tmp_path / "o"), "--json", str(out)) == 0
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # the launcher's are gone
    data = json.loads(out.read_text())
    pipe = data["pipeline"]
    assert pipe["stages"] == 3 and pipe["micro_batches"] == 2 and pipe["split_by"] == "parameters"
    stages = pipe["per_stage"]
    assert [s["percent"] for s in stages] == [[100, 0, 100, 0, 100, 0]] * 2 + [[0, 100, 100, 0, 100, 0]]
    assert stages[0]["first_layer"] == "embed" and stages[-1]["last_layer"] == "lm_head"
    for s in stages:
        assert s["busy_s"] > 0 and s["wait_send_s"] >= 0 and s["cost"] > 0
        assert s["bubble_s"] >= 0 and s["transfer_s"] >= 0  # one host: the wait splits in two
        assert s["bubble_s"] + s["transfer_s"] == pytest.approx(s["wait_input_s"])
        assert s["startup_s"]["total"] > 0 and s["startup_s"]["pinning"] == 0  # nothing is pinned without a GPU
    assert stages[2]["bubble_s"] > 0  # the last stage waits for the first two at least in prefill
    costs = [s["cost"] for s in stages]
    assert max(costs) - min(costs) <= 41e6  # within one layer: the embedding's (50272 + 2050) x 768
    assert data["metrics"]["batch_size"] == 4 and data["metrics"]["gen_len"] == 3
    assert "stage 2 (layers" in capsys.readouterr().out


def test_cli_refusals_name_the_stage(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = run_cli("--pipeline", "2", "--cpu-mem", "100MiB", "--stage-percent", "1", "0", "100", "100", "0", "100", "0",
                   "--json", str(out), "--offload-dir", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert code == 2 and "error: pipeline failed: stage 1 of 2 (layers 13-25): policy does not fit" in err
    assert "the CPU tier needs" in err and not out.exists()
    assert run_cli("--pipeline", "2", "--stage-percent", "2", *["50"] * 6) == 2
    assert "names stage 2, but the stages are 0 to 1" in capsys.readouterr().err
    assert run_cli("--micro-batches", "2") == 2
    assert "Add --pipeline N" in capsys.readouterr().err
    assert run_cli("--pipeline", "30") == 2
    assert "30 pipeline stages for 26 layers" in capsys.readouterr().err


def test_cost_model_split_follows_streamed_bytes():
    """With the weights streamed from the CPU, a decoder layer costs its bytes over PCIe: the MLP
    (2 x h x 4h) twice the attention (4 x h x h), so the cost-model split puts the seams there."""
    from offload_engine.model_zoo import MODEL_CONFIGS
    from offload_engine.pipeline.split import stage_split
    from offload_engine.policies.cost_model import layer_seconds
    from offload_engine.policies.hardware import HardwareProfile

    hw = HardwareProfile(gpu_mem_bytes=16 << 30, cpu_mem_bytes=200 << 30, h2d_bytes_s=25e9, gpu_flops=700e12,
                         gpu_mem_bytes_s=3e12)
    model, work = MODEL_CONFIGS["opt-6.7b"], Workload(512, 32)
    streamed = Policy.from_percent((0, 100, 100, 0, 100, 0), gpu_batch_size=8)
    costs = layer_seconds(model, streamed, work, hw)
    attn, mlp = costs[1], costs[2]
    assert len(costs) == 2 * 32 + 2 and mlp / attn == pytest.approx(2.0, rel=1e-3)
    assert attn == pytest.approx((4 * 4096 * 4096 + 4 * 4096 + 2 * 4096) * 2 / 25e9, rel=1e-3)
    splits, stage_costs, unit = stage_split(model, streamed, work, 4, hw)
    assert unit.startswith("cost model") and max(stage_costs) - min(stage_costs) <= max(costs)
    resident = Policy.from_percent((100, 0, 100, 0, 100, 0), gpu_batch_size=8)
    assert sum(layer_seconds(model, resident, work, hw)) < sum(costs) / 10  # no streaming: only compute


@pytest.mark.parametrize("stages", [4, 8])
def test_four_and_eight_stages(checkpoints, tmp_path, stages):
    """N = 4 and 8 processes (the tiny OPT has 8 scheduled layers: one each at 8), placements cycling."""
    ids, mask = random_prompts(2 * stages, PROMPT, seed=stages)
    placements = [(ON_GPU, ON_CPU, CPU_ATTN, ON_DISK)[k % 4] for k in range(stages)]
    got = pipeline(checkpoints["opt"], tmp_path, placements, stages, 1, ids, mask)
    assert [s["layers"][1] - s["layers"][0] for s in got["stages"]] == ([2, 2, 2, 2] if stages == 4 else [1] * 8)
    assert_same(got, single_process(checkpoints["opt"], tmp_path, stages, ids, mask))


def test_interrupted_pipeline_writes_nothing_and_stops_its_stages(tmp_path):
    import subprocess
    import sys

    import psutil

    out, offload = tmp_path / "r.json", tmp_path / "o"
    cmd = [sys.executable, "-m", "offload_engine", "run", "--pipeline", "2", "--quiet", "--device", "cpu",
           "--prompt-len", "64", "--gen-len", "500", "--percent", "0", "0", "100", "0", "100", "0",
           "--offload-dir", str(offload), "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(offload.glob("stage1/*")):  # stage 1 has its weights on disk
        time.sleep(0.2)
    stages = [p for p in parent.children(recursive=True) if "spawn" in " ".join(p.cmdline())]
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and not out.exists()
    assert not offload.exists()
    assert len(stages) >= 2 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stages)


def test_torchrun_runs_the_same_command(tmp_path):
    """`torchrun --nproc-per-node 2 -m offload_engine run --pipeline 2`: rank 0 reports and writes the JSON."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "offload_engine", "run",
           "--pipeline", "2", "--quiet", "--device", "cpu", "--prompt-len", "8", "--gen-len", "3",
           "--offload-dir", str(tmp_path / "o"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["pipeline"]["stages"] == 2 and data["metrics"]["gen_len"] == 3
    assert done.stdout.count("total throughput") == 1  # one report, from rank 0
    bad = subprocess.run(cmd[:-2] + ["--pipeline", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "torchrun started 2 processes for --pipeline 3" in bad.stderr
