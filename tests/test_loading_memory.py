"""Loading streams one tensor at a time: the host memory a load adds stays within what the plan
places in host memory plus a staging buffer of about one tensor, never a second copy of the model."""
from __future__ import annotations

import time

import pytest
import torch

from offload_engine.engine import Engine, EngineOptions
from offload_engine.io.tiers import Tier
from offload_engine.metrics import PeakHostMemory
from offload_engine.checkpoints.hf import from_hf_config
from offload_engine.policies import Compression
from offload_engine.policies.memory import Workload
from offload_engine.policies.placement import Policy

from conftest import save_checkpoint, transformers

MiB = 1 << 20


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """An OPT of ~40M parameters (160 MB of float32 weights in one safetensors file)."""
    cfg = transformers.OPTConfig(vocab_size=16384, hidden_size=512, num_hidden_layers=10, ffn_dim=2048,
                                 num_attention_heads=8, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg)
    folder = save_checkpoint(model, tmp_path_factory.mktemp("big"), "safetensors")
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4
    del model
    return folder, params * 4, largest


def test_loading_to_disk_adds_one_tensor_not_the_model(big_checkpoint, tmp_path):
    folder, model_bytes, largest = big_checkpoint
    policy = Policy.from_percent((0, 0, 100, 0, 100, 0), gpu_batch_size=1)  # weights on disk
    opts = EngineOptions(checkpoint=folder, offload_dir=tmp_path, progress=False, dtype=torch.float32, device="cpu")
    with PeakHostMemory() as loading:
        engine = Engine(from_hf_config(folder), policy, Workload(8, 2), opts)
    with engine:
        host_planned = sum(engine.plan.persistent_bytes(t) for t in (Tier.GPU, Tier.CPU))  # on CPU both are host
        assert engine.plan.tiers[Tier.DISK].weights > 0.95 * model_bytes
    bound = host_planned + 3 * largest + 48 * MiB  # staging (read + converted copy) and library slack
    assert loading.added_bytes < bound, (loading.added_bytes / MiB, bound / MiB)
    assert loading.added_bytes < 0.6 * model_bytes + host_planned  # a second copy of the model would not fit


def test_peak_host_memory_sees_an_allocation():
    # 256 MiB is above any allocator's reuse of freed memory: fresh pages, counted when touched
    # The block lives until the sampling thread has run twice more, however busy the process is
    # (threads left by earlier tests compete for the interpreter).
    with PeakHostMemory(interval_s=0.001) as peak:
        block = torch.ones(256 * MiB, dtype=torch.uint8)
        block.add_(1)
        seen, deadline = peak.samples, time.monotonic() + 30
        while peak.samples < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        del block
    assert peak.samples >= seen + 2 and peak.added_bytes >= 200 * MiB


class _Rows:
    """A weight target that keeps every block of rows it is handed."""

    def __init__(self):
        self.blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def store(self, key, tensor, row_start=0):
        self.blocks.setdefault(key, []).append((row_start, tensor.clone()))

    def whole(self, key):
        return torch.cat([t for _, t in sorted(self.blocks[key], key=lambda b: b[0])])


TINY = dict(name="tiny", family="opt", num_layers=2, hidden_size=64, num_heads=4, ffn_dim=128, vocab_size=300,
            max_positions=64)


@pytest.mark.parametrize("compress", [None, Compression(4, 64)])
def test_dummy_weights_are_drawn_in_bounded_blocks_of_rows(monkeypatch, tmp_path, compress):
    """Dummy init draws at most DUMMY_CHUNK_ELEMENTS at a time (a whole fp32 embedding did not fit
    beside a nearly full GPU plan), the blocks tile each tensor, and a home written block by block,
    packed or not, holds what the whole tensor would give."""
    from offload_engine.kernels.quant.pack import quantize
    from offload_engine import weights
    from offload_engine.model_zoo import OPT_CONFIGS

    monkeypatch.setattr(weights, "DUMMY_CHUNK_ELEMENTS", 1000)
    cfg = OPT_CONFIGS["opt-125m"].__class__(**TINY)
    policy = Policy.from_percent((0, 100, 0, 100, 0, 100), compress_weight=compress)
    opts = EngineOptions(offload_dir=tmp_path, progress=False, seed=3)
    with Engine(cfg, policy, Workload(4, 2), opts) as engine:
        rows = _Rows()
        specs = {s.key: s for layer in engine.layers for s in layer.weight_specs()}
        weights.dummy_weights(specs, rows, 3, engine.device, progress=False)
        assert any(len(blocks) > 1 for blocks in rows.blocks.values())  # the embedding (300 x 64) is cut
        for key, spec in specs.items():
            starts = [(s, t.shape[0]) for s, t in rows.blocks[key]]
            assert [s for s, _ in starts] == sorted(s for s, _ in starts)
            assert all(s1 == s0 + n0 for (s0, n0), (s1, _) in zip(starts, starts[1:]))
            whole = rows.whole(key)
            assert whole.shape == spec.shape
            assert all(t.numel() <= max(1000, spec.shape[-1] if len(spec.shape) > 1 else t.numel())
                       for _, t in rows.blocks[key])
            home = engine.weights.homes[key][1]
            if key in engine.weights.packed:
                expected = quantize(whole.float(), engine.weights.quant_spec).to(home.device)
            else:
                expected = whole.to(home.device, home.dtype)  # drawn on the compute device (a GPU's)
            assert torch.equal(home, expected), key
