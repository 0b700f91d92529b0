"""The Triton backend beyond the op-by-op tests of test_ops.py (which run it
on every device it serves, through Triton's interpreter without a GPU): its
registration, its dtype limits, Triton vs CUDA equality, and the Refiner with
backend='triton' against upstream."""
import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import _backend, _extension, reference

from conftest import BACKEND_CASES, heavy_on_gpu, needs_cuda
from helpers import check_outputs, check_refiner_in_a_cuda_graph, random_bn_, refiner_inputs

TRITON_CASES = [c for c in BACKEND_CASES if c.values[1] == "triton"]

Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_triton_ops_are_registered_with_the_cpp_schemas(device, backend):
    for name in ("select_sampling", "select_thresholding", "crop", "crop_into", "replace", "compose", "compose_into"):
        ours = getattr(torch.ops.pymatting_ext_triton, name).default._schema
        if not _extension.available():
            continue
        cpp = getattr(torch.ops.pymatting_ext, name).default._schema
        # Same arguments and types; only the namespace (and return names) differ.
        assert [(a.name, str(a.type)) for a in ours.arguments] == [(a.name, str(a.type)) for a in cpp.arguments]
        assert [str(r.type) for r in ours.returns] == [str(r.type) for r in cpp.returns]


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_triton_rejects_float64_with_a_clear_error(device, backend):
    err = torch.rand(1, 1, 4, 4, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="triton.*float64"):
        pm.select_sampling(err, 3, backend="triton")
    with pytest.raises(ValueError, match="triton.*float64"):
        pm.Refiner("sampling", 100, 0.1, backend="triton").double().to(device)(
            *refiner_inputs(1, 16, 16, 4, 4, device, torch.float64))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_triton_opcheck(device, backend):
    ops = torch.ops.pymatting_ext_triton
    err = torch.rand(2, 1, 6, 7, device=device)
    _, idx, valid = reference.select_sampling(err, 5, True)
    hid = torch.rand(2, 3, 3, 4, device=device)
    patches = torch.rand(10, 4, 4, 4, device=device)
    coarse = torch.rand(2, 4, 3, 4, device=device)
    src = torch.rand(2, 3, 24, 28, device=device)
    cases = [
        (ops.select_sampling.default, (err, 5, True)),
        (ops.select_thresholding.default, (err, 0.5)),
        (ops.crop.default, ([hid, src], idx, 2, 3, [12, 14], [8, 8])),
        (ops.crop_into.default, ([hid, src], idx, 2, 3, [12, 14], 1,
                                 torch.zeros(idx.shape[0], 7, 8, 8, device=device).contiguous(
                                     memory_format=torch.channels_last))),
        (ops.replace.default, (torch.rand(2, 4, 24, 28, device=device), patches, idx, valid)),
        (ops.compose.default, (coarse, patches, idx, valid, [24, 28], src)),
        (ops.compose_into.default, (coarse, patches, idx, valid, src, torch.zeros(2, 4, 24, 28, device=device))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


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


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("mode", ["sampling", "thresholding", "full"])
@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("prevent", [True, False])
@pytest.mark.parametrize("B,H,W,Hc,Wc", [(1, 36, 52, 9, 13), (2, 64, 96, 16, 24)])
def test_refiner_triton_matches_upstream(device, backend, mode, kernel_size, prevent, B, H, W, Hc, Wc):
    up = random_bn_(Upstream(mode, 16 * 40, 0.4, kernel_size, prevent)).to(device).eval()
    ours = pm.Refiner(mode, 16 * 40, 0.4, kernel_size, prevent, backend="triton").to(device).eval()
    ours.load_state_dict(up.state_dict())
    x = refiner_inputs(B, H, W, Hc, Wc, device)
    with torch.no_grad():
        check_outputs(up(*x), ours(*x), 1e-5)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refiner_triton_half_precision_matches_the_reference_backend(device, backend, dtype):
    ours = random_bn_(pm.Refiner("sampling", 16 * 40, 0.4, backend="triton")).to(device, dtype).eval()
    ref = pm.Refiner("sampling", 16 * 40, 0.4, backend="reference").to(device, dtype).eval()
    ref.load_state_dict(ours.state_dict())
    x = refiner_inputs(2, 64, 96, 16, 24, device, dtype)
    with torch.no_grad():
        check_outputs(ref(*x), ours(*x), 2e-2)


# -- the backend switch --------------------------------------------------------

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


@pytest.mark.parametrize("device,backend", heavy_on_gpu(TRITON_CASES))
@pytest.mark.parametrize("mode", ["sampling", "full"])
def test_refiner_triton_compiles_fullgraph(device, backend, mode):
    # On a GPU torch.compile traces into the kernels' launches (triton_op);
    # under the interpreter the ops are opaque, with the C++ ops' fakes.
    torch._dynamo.reset()
    refiner = random_bn_(pm.Refiner(mode, 16 * 40, 0.4, backend="triton")).to(device).eval()
    x = refiner_inputs(2, 64, 96, 16, 24, device)
    with torch.no_grad():
        eager = refiner(*x)
        compiled = torch.compile(refiner, fullgraph=True)(*x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("mode", ["sampling", "thresholding"])
def test_refiner_triton_training_step_matches_upstream(device, backend, mode):
    # In float32, BatchNorm's batch statistics amplify the last-bit
    # differences of the crops (the reference backend, exact against upstream
    # in float64, is as far from upstream): Triton is held to the reference
    # backend tightly and to upstream at that float32 noise.
    up = random_bn_(Upstream(mode, 16 * 40, 0.4)).to(device).train()
    models = {"upstream": up}
    for b in ("triton", "reference"):
        models[b] = pm.Refiner(mode, 16 * 40, 0.4, backend=b).to(device).train()
        models[b].load_state_dict(up.state_dict())
    x = refiner_inputs(2, 64, 96, 16, 24, device)
    grads = {}
    for name, model in models.items():
        xs = [t.clone().requires_grad_() for t in x]
        out = model(*xs)
        (out[0].square().mean() + out[1].square().mean()).backward()
        grads[name] = [p.grad for p in model.parameters()] + [t.grad for t in xs]
    for i, (a, b, c) in enumerate(zip(grads["upstream"], grads["reference"], grads["triton"])):
        assert (a is None) == (b is None) == (c is None), i
        if a is None:
            continue
        scale = max(1e-3, float(a.abs().max()))
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5 * scale, msg=f"gradient {i} vs reference backend")
        torch.testing.assert_close(c, a, rtol=1e-2, atol=2e-3 * scale, msg=f"gradient {i} vs upstream")


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_select_sampling_over_several_chunks(device, backend):
    # Large enough that every image is split over several programs (more
    # than 16 blocks of the interpreter's 8192), with ties across chunks.
    err = (torch.rand(2, 1, 400, 700) * 4).floor() / 4
    err[0, 0, 5, 5] = float("nan")
    err[1, 0, -1, -1] = float("-inf")
    err = err.to(device)
    for k in (1, 30_000, 279_999):
        got = pm.select_sampling(err, k, True, backend="triton")
        want = reference.select_sampling(err.cpu(), k, True)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w)


@needs_cuda
@pytest.mark.parametrize("prevent", [True, False])
def test_refiner_triton_captured_in_a_cuda_graph(prevent):
    check_refiner_in_a_cuda_graph("triton", prevent)


# -- the fused patch kernel through the Refiner ----------------------------------

@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("mode,prevent", [("sampling", True), ("sampling", False), ("thresholding", True)])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_fused_refiner_matches_upstream(device, backend, mode, prevent, kernel_size, monkeypatch):
    from pymatting_ext import refiner as refiner_module

    calls = []
    real = refiner_module._py_refine_fused
    monkeypatch.setattr(refiner_module, "_py_refine_fused", lambda *a: calls.append(1) or real(*a))
    up = random_bn_(Upstream(mode, 16 * 60, 0.5, kernel_size, prevent)).to(device).eval()
    ours = pm.Refiner(mode, 16 * 60, 0.5, kernel_size, prevent, backend=backend, fused=True).to(device).eval()
    ours.load_state_dict(up.state_dict())
    x = refiner_inputs(2, 40, 56, 10, 14, device)
    x[4][:, :, :3] = 0  # cells of zero error: invalid with prevent_oversampling
    with torch.no_grad():
        want = up(*x)
        check_outputs(want, ours(*x))
        pha, fgr, ref = ours.forward_matting(*x)
    assert len(calls) == 2
    check_outputs((want[0].clamp(0, 1), (want[1] + x[0]).clamp(0, 1), want[2]), (pha, fgr, ref))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_fused_refiner_refuses_what_it_cannot_run(device, backend):
    with pytest.raises(ValueError, match="fused=True needs backend='triton'"):
        with torch.no_grad():
            pm.Refiner("sampling", 64, 0.1, backend="reference", fused=True).eval()(
                *refiner_inputs(1, 16, 16, 4, 4, device))
    with pytest.raises(ValueError, match="fused=True runs without autograd"):
        pm.Refiner("sampling", 64, 0.1, backend=backend, fused=True).to(device).eval()(
            *refiner_inputs(1, 16, 16, 4, 4, device))
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        pm.Refiner("sampling", 64, 0.1, fused="yes")
