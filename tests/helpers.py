"""Shared test helpers."""
import os
import sys

import torch
import torch.nn.functional as F


def subprocess_env(**extra):
    """This process's environment for a Python subprocess that imports what
    this one does (its sys.path as PYTHONPATH), plus extra."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **extra)


def random_bn_(module):
    """Random BatchNorm statistics and affine parameters, so that folding and
    batch statistics are actually exercised."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module


def refiner_inputs(B, H, W, Hc, Wc, device="cpu", dtype=torch.float32, err=None):
    """src, bgr, pha, fgr, err, hid as MattingRefine would hand them over."""
    g = lambda *s: torch.rand(*s, device=device, dtype=torch.float32)
    src, bgr = g(B, 3, H, W), g(B, 3, H, W)
    pha = g(B, 1, Hc, Wc)
    fgr = (torch.randn(B, 3, Hc, Wc, device=device) * 0.1)
    err = g(B, 1, Hc, Wc) if err is None else err.to(device)
    hid = g(B, 32, Hc, Wc)
    return tuple(t.to(dtype) for t in (src, bgr, pha, fgr, err, hid))


def layouts(t, kind):
    """The same values as contiguous, channels-last or a sliced view."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(t.shape[0], t.shape[1] + 2, t.shape[2], t.shape[3] * 2, dtype=t.dtype, device=t.device)
    view = big[:, 1:1 + t.shape[1], :, ::2]
    view.copy_(t)
    assert view.numel() == 0 or not view.is_contiguous()
    return view


def cpu(*ts):
    return [None if t is None else t.cpu() for t in ts]


def check_outputs(a, b, atol=1e-5):
    """Two refiners' (pha, fgr, ref): the same shapes, dtypes and devices,
    ref equal, pha and fgr within atol scaled to the outputs' magnitude."""
    assert len(a) == len(b) == 3
    for name, u, o in zip(("pha", "fgr", "ref"), a, b):
        assert u.shape == o.shape and u.dtype == o.dtype and u.device == o.device, name
    assert torch.equal(a[2], b[2]), "ref"
    for name, u, o in zip(("pha", "fgr"), a[:2], b[:2]):
        # Random weights give outputs up to |x| ~ 10: scale the bound.
        bound = atol * max(1.0, float(u.detach().abs().max()))
        diff = float((u - o).detach().abs().max())
        assert diff <= bound, f"{name}: max abs diff {diff:.3g} > {bound:.3g}"


def quarter_err(err, H, W):
    return F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)


def check_tie_tolerant(up, ours, err, k, atol, mean_atol=None):
    """Two sampling refiners' (pha, fgr, ref) (prevent_oversampling=False):
    the selections may differ only among cells tied with the k-th largest
    error (upstream's topk breaks ties arbitrarily); pha and fgr agree within
    atol (scaled to the outputs' magnitude) on every 4x4 block both chose
    alike. Returns the number of cells chosen differently."""
    H, W = up[0].shape[2:]
    err_q = quarter_err(err, H, W)
    B = err.shape[0]
    differ = up[2] != ours[2]
    if bool(differ.any()):
        kth = err_q.view(B, -1).float().topk(k, dim=1).values[:, -1].view(B, 1, 1, 1)
        assert bool((err_q.float() == kth)[differ].all()), "a selection differs beyond a tie"
    keep = ~F.interpolate(differ.float(), scale_factor=4, mode="nearest").bool()
    for name, u, o in zip(("pha", "fgr"), up[:2], ours[:2]):
        assert u.shape == o.shape and u.dtype == o.dtype, name
        scale = max(1.0, float(u.abs().max()))
        diff = (u.float() - o.float()).abs() * keep
        assert float(diff.max()) <= atol * scale, f"{name}: max |diff| {float(diff.max()):.3g}"
        if mean_atol is not None:
            assert float(diff.mean()) <= mean_atol * scale, f"{name}: mean |diff| {float(diff.mean()):.3g}"
    return int(differ.sum())


def assert_close(actual, expected, atol, rtol=0.0, msg=""):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    nan_same = torch.isnan(actual.double()) == torch.isnan(expected.double())
    assert bool(nan_same.all()), f"{msg}: NaN positions differ"
    bad = (diff > bound) & ~torch.isnan(diff)
    assert not bool(bad.any()), f"{msg}: max abs diff {diff[~torch.isnan(diff)].max().item():.3g} > atol {atol}"


def check_refiner_in_a_cuda_graph(backend, prevent, size=(2, 256, 384, 64, 96), sample_pixels=5000):
    """The eval sampling Refiner on `backend`, captured once in a CUDA graph
    and replayed on new inputs copied into the captured ones, equals eager
    runs on those inputs (and the reference implementation): nothing in it
    synchronises with the host or depends on the data's shapes. size is
    (B, H, W, Hc, Wc)."""
    import pymatting_ext as pm
    from pymatting_ext import reference

    B, H, W, Hc, Wc = size
    model = random_bn_(pm.Refiner("sampling", sample_pixels, 0.1, prevent_oversampling=prevent, backend=backend))
    model = model.cuda().eval()
    static = [t.clone() for t in refiner_inputs(B, H, W, Hc, Wc, device="cuda")]
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(*static)
    for _ in range(2):
        fresh = refiner_inputs(B, H, W, Hc, Wc, device="cuda")
        # Some cells with zero error, so that invalid patches are exercised.
        fresh[4][:, :, : Hc // 3] = 0
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        with torch.inference_mode():
            eager = model(*fresh)
            ref_out = reference.refine(model, *fresh)
        assert len(captured) == len(eager) == 3
        assert torch.equal(captured[2], eager[2]), "ref"
        assert torch.equal(eager[2], ref_out[2]), "ref vs reference"
        for name, c, e, r in zip(("pha", "fgr"), captured[:2], eager[:2], ref_out[:2]):
            assert c.shape == e.shape and c.dtype == e.dtype
            bound = 1e-5 * max(1.0, float(e.abs().max()))
            assert float((c - e).abs().max()) <= bound, name
            assert float((e - r).abs().max()) <= bound, f"{name} vs reference"


def op_calls(backend, device="cpu", seed=0):
    """{op name: a function calling pymatting_ext.ops.run_<op> on `backend`
    with fixed random inputs on `device` (from `seed`) and returning its
    outputs as a tuple}: every op, crop_into and compose_into writing into a
    fresh buffer."""
    import pymatting_ext as pm
    from pymatting_ext import reference

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g).to(device)
    err = r(2, 1, 30, 40)
    _, idx, valid = reference.select_sampling(err, 200, True)
    hid, src = r(2, 8, 15, 20), r(2, 3, 120, 160)
    coarse, x, patches = r(2, 4, 30, 40), r(2, 4, 120, 160), r(idx.shape[0], 4, 4, 4)
    ops = pm.ops

    def crop_into():
        out = torch.zeros(idx.shape[0], 10, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
        ops.run_crop_into(backend, [src], idx, 4, 2, (120, 160), 7, out)
        return (out,)

    def compose_into():
        out = torch.full_like(x, float("nan"))
        ops.run_compose_into(backend, coarse, patches, idx, valid, src, out)
        return (out,)

    return {
        "select_sampling": lambda: tuple(ops.run_select_sampling(backend, err, 200, True)),
        "select_thresholding": lambda: tuple(ops.run_select_thresholding(backend, err, 0.5)),
        "crop": lambda: (ops.run_crop(backend, [hid, src], idx, 2, 3, (60, 80)),),
        "crop_into": crop_into,
        "replace": lambda: (ops.run_replace(backend, x, patches, idx, valid),),
        "compose": lambda: (ops.run_compose(backend, coarse, patches, idx, valid, (120, 160), src),),
        "compose_into": compose_into,
    }
