"""The Refiner on each compiled GPU-capable backend, beyond test_refiner.py
(which runs 'auto' and 'reference'): backend='triton' against upstream's
Refiner (backgroundmattingv2==1.0) with the same weights (through Triton's
interpreter without a GPU), in half precision against the reference
backend, and one training step's gradients; the fused patch kernel through
the Refiner (fused=True, and what it refuses); and, on a GPU, 'cuda',
'triton' (fused) and 'triton-unfused' at the refiner's real sizes: against
upstream at HD and 4K, no host synchronisation, determinism. (In a CUDA
graph: test_refiner_capture.py.)"""
import pytest
import torch

import pymatting_ext as pm

from conftest import GPU_CASES, GPU_REFINER_CASES, TRITON_CASES
from helpers import check_outputs, check_tie_tolerant, op_calls, random_bn_, refiner_inputs

Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner


# -- backend='triton' --------------------------------------------------------------

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


# -- the fused patch kernel through the Refiner ----------------------------------

@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("mode,prevent", [("sampling", True), ("sampling", False), ("thresholding", True)])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_fused_refiner_matches_upstream(device, backend, mode, prevent, kernel_size, monkeypatch):
    from pymatting_ext import refiner as refiner_module

    calls = []
    real = refiner_module.refine_sparse
    monkeypatch.setattr(refiner_module, "refine_sparse", lambda *a: calls.append(1) or real(*a))
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


# -- on a GPU, at the refiner's real sizes -------------------------------------------

def refiner(mode, sample_pixels, threshold, kernel_size, prevent, backend):
    """Our Refiner for a REFINER_BACKENDS entry."""
    fused = False if backend == "triton-unfused" else None
    return pm.Refiner(mode, sample_pixels, threshold, kernel_size, prevent, backend=backend.split("-")[0],
                      fused=fused)


#: (H, W, backbone_scale, sample_pixels) of upstream's speed test.
HD = (1080, 1920, 0.25, 80_000)
UHD = (2160, 3840, 0.125, 320_000)


def models(mode, sample_pixels, kernel_size, prevent, backend, dtype, threshold=0.1):
    up = random_bn_(Upstream(mode, sample_pixels, threshold, kernel_size, prevent))
    ours = refiner(mode, sample_pixels, threshold, kernel_size, prevent, backend)
    ours.load_state_dict(up.state_dict())
    return up.cuda().to(dtype).eval(), ours.cuda().to(dtype).eval()


@pytest.mark.parametrize("device,backend", GPU_REFINER_CASES)
# NB: 4K with batch 4 is the heaviest case; the GPU check runs it last.
@pytest.mark.parametrize("setting,B", [(HD, 1), (HD, 4), (UHD, 1),
                                       pytest.param(UHD, 4, marks=pytest.mark.gpu_extra)],
                         ids=["HD-1", "HD-4", "4K-1", "4K-4"])
@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_refiner_matches_upstream_at_real_sizes(device, backend, setting, B, kernel_size, dtype):
    # TF32 is off (conftest): fp32 within DESIGN's 1e-5 (scaled); fp16
    # against upstream's own fp16 run, which rounds differently (BatchNorm
    # applied after the rounded convolution, ours folded before it).
    H, W, scale, pixels = setting
    up, ours = models("sampling", pixels, kernel_size, False, backend, dtype)
    x = refiner_inputs(B, H, W, int(H * scale), int(W * scale), "cuda", dtype)
    with torch.inference_mode():
        want, got = up(*x), ours(*x)
    k = min(pixels // 16, (H // 4) * (W // 4))
    if dtype == torch.float32:
        check_tie_tolerant(want, got, x[4], k, atol=1e-5)
    else:
        check_tie_tolerant(want, got, x[4], k, atol=5e-2, mean_atol=2e-3)


@pytest.mark.parametrize("device,backend", GPU_REFINER_CASES)
@pytest.mark.parametrize("mode", ["thresholding", "full"])
def test_refiner_other_modes_match_upstream_at_hd(device, backend, mode):
    H, W, scale, pixels = HD
    up, ours = models(mode, pixels, 3, True, backend, torch.float32, threshold=0.7)
    x = refiner_inputs(1, H, W, int(H * scale), int(W * scale), "cuda")
    with torch.inference_mode():
        want, got = up(*x), ours(*x)
    assert torch.equal(want[2], got[2])
    for u, o in zip(want[:2], got[:2]):
        assert float((u - o).abs().max()) <= 1e-5 * max(1.0, float(u.abs().max()))


def hd_model_and_inputs(backend, dtype=torch.float32, prevent=True):
    H, W, scale, pixels = HD
    model = random_bn_(refiner("sampling", pixels, 0.1, 3, prevent, backend)).cuda().to(dtype).eval()
    return model, refiner_inputs(1, H, W, int(H * scale), int(W * scale), "cuda", dtype)


@pytest.mark.parametrize("device,backend", GPU_REFINER_CASES)
@pytest.mark.parametrize("prevent", [True, False])
def test_eval_sampling_at_hd_never_synchronises(device, backend, prevent):
    model, x = hd_model_and_inputs(backend, prevent=prevent)
    with torch.inference_mode():
        model(*x)
        model(*x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(*x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device,backend", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_refiner_is_deterministic(device, backend, dtype):
    model, x = hd_model_and_inputs(backend, dtype)
    with torch.inference_mode():
        first = model(*x)
        for _ in range(5):
            for a, b in zip(first, model(*x)):
                assert torch.equal(a, b)
    for name, call in op_calls(backend, "cuda").items():
        first = [t.clone() for t in call()]
        for _ in range(5):
            for a, b in zip(first, call()):
                assert torch.equal(a, b), name
