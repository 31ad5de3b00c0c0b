"""The shared layer ops against plain PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from offload_engine.models.ops import linear_relu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_relu_matches_unfused_and_float64(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 24, generator=g).to(dtype)
    w = {"fc1.weight": torch.randn(40, 24, generator=g).to(dtype), "fc1.bias": torch.randn(40, generator=g).to(dtype)}
    out = linear_relu(x, w, "fc1")
    assert out.shape == (3, 7, 40) and out.dtype == dtype
    assert torch.equal(out, F.relu(F.linear(x, w["fc1.weight"], w["fc1.bias"])))  # rounding keeps signs
    ref = F.relu(x.double() @ w["fc1.weight"].double().T + w["fc1.bias"].double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert (out < 0).sum() == 0 and (out == 0).any()  # the ReLU ran: random inputs have negatives


def test_linear_relu_without_bias_and_non_contiguous_input():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 10, 16, generator=g).transpose(0, 1)  # not contiguous
    w = {"fc1.weight": torch.randn(8, 16, generator=g)}
    assert torch.equal(linear_relu(x, w, "fc1"), F.relu(F.linear(x, w["fc1.weight"])))
    w["fc1.bias"] = torch.randn(8, generator=g)
    torch.testing.assert_close(linear_relu(x, w, "fc1"), F.relu(F.linear(x, w["fc1.weight"], w["fc1.bias"])))
