"""Choosing a backend: 'auto' (deterministic, as documented), the
environment variable that overrides it, why a backend that cannot run says
so (another device, no Triton, no interpreter, no CUDA kernels, float64 on
Triton), and the compiled GPU backends against one another (Triton = CUDA,
every op)."""
import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import _backend, _extension, reference

from conftest import TRITON_CASES, needs_cuda
from helpers import refiner_inputs


def test_auto_is_deterministic_and_documented(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    assert _backend.resolve("auto", cpu) == ("cpu" if _extension.available() else "reference")
    # Triton is never chosen for CPU tensors, even under its interpreter.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("auto", cpu) == ("cpu" if _extension.available() else "reference")
    cuda = torch.device("cuda")
    want = "cuda" if _extension.cuda_kernels() else ("triton" if _backend.triton_status()[0] else "reference")
    assert _backend.resolve("auto", cuda, torch.float32) == want
    want64 = "cuda" if _extension.cuda_kernels() else "reference"
    assert _backend.resolve("auto", cuda, torch.float64) == want64
    assert _backend.resolve("auto", torch.device("meta")) == "reference"


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.resolve("auto", torch.device("cpu")) == "reference"
    # An explicit backend still wins.
    if _extension.available():
        assert _backend.resolve("cpu", torch.device("cpu")) == "cpu"
    err = torch.rand(1, 1, 6, 6)
    assert torch.equal(pm.select_sampling(err, 4)[1], reference.select_sampling(err, 4, True)[1])
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        pm.select_sampling(err, 4)
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=_backend.ENV_VAR):
        pm.select_sampling(err, 4)


def test_unavailable_backends_say_why(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA tensors"):
        _backend.resolve("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.triton_status()[0]:
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            _backend.resolve("triton", cpu)
    monkeypatch.setattr(_backend, "_triton_state", (False, "Triton is not installed (test)"))
    with pytest.raises(RuntimeError, match="not installed"):
        _backend.resolve("triton", torch.device("cuda"))
    if not _extension.cuda_kernels():
        with pytest.raises(RuntimeError, match="without its CUDA kernels"):
            _backend.resolve("cuda", torch.device("cuda"))


def test_backend_for_another_device_says_why():
    # (test_unavailable_backends_say_why and the test below cover a missing
    # Triton, the interpreter and dtype limits.)
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        pm.Refiner("sampling", 1000, 0.1, backend="cuda")(*refiner_inputs(2, 32, 48, 8, 12))
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors"):
        pm.select_sampling(torch.rand(1, 1, 4, 4), 2, backend="cuda")


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_triton_rejects_float64_with_a_clear_error(device, backend):
    err = torch.rand(1, 1, 4, 4, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="triton.*float64"):
        pm.select_sampling(err, 3, backend="triton")
    with pytest.raises(ValueError, match="triton.*float64"):
        pm.Refiner("sampling", 100, 0.1, backend="triton").double().to(device)(
            *refiner_inputs(1, 16, 16, 4, 4, device, torch.float64))


# -- the compiled GPU backends against one another ----------------------------------

@needs_cuda
@pytest.mark.skipif(not _extension.cuda_kernels(), reason="the extension has no CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_equals_cuda(dtype):
    B, H, W = 2, 120, 164
    err = torch.rand(B, 1, H // 4, W // 4, device="cuda").to(dtype)
    for k in (1, 300, 10_000):
        a = pm.select_sampling(err, k, True, backend="triton")
        b = pm.select_sampling(err, k, True, backend="cuda")
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    a = pm.select_thresholding(err, 0.3, backend="triton")
    b = pm.select_thresholding(err, 0.3, backend="cuda")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    _, idx, valid = pm.select_sampling(err, 500, True, backend="cuda")
    hid = torch.rand(B, 32, H // 4, W // 4, device="cuda").to(dtype)
    src = torch.rand(B, 3, H, W, device="cuda").to(dtype)
    a = pm.crop([hid, src], idx, 2, 3, (H // 2, W // 2), backend="triton")
    b = pm.crop([hid, src], idx, 2, 3, (H // 2, W // 2), backend="cuda")
    torch.testing.assert_close(a, b, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
    patches = torch.rand(idx.shape[0], 4, 4, 4, device="cuda").to(dtype)
    coarse = torch.rand(B, 4, H // 4, W // 4, device="cuda").to(dtype)
    assert torch.equal(pm.replace(src[:, :3].repeat(1, 2, 1, 1)[:, :4], patches, idx, valid, backend="triton"),
                       pm.replace(src[:, :3].repeat(1, 2, 1, 1)[:, :4], patches, idx, valid, backend="cuda"))
    a = pm.compose(coarse, patches, idx, valid, (H, W), src, backend="triton")
    b = pm.compose(coarse, patches, idx, valid, (H, W), src, backend="cuda")
    torch.testing.assert_close(a, b, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=0)
