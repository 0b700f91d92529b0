"""Shared test helpers."""
import os
import sys

import torch
import torch.nn.functional as F

#: The tests folder (tests/), where cpp/ and the shared scripts are, from any
#: of its subfolders.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


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


#: Tolerance of the compiled bilinear (crop's and compose's resampling)
#: against F.interpolate's: the same formula, but PyTorch's own kernel may
#: contract to FMA.
BILINEAR_ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


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


# -- the CUDA kernels' cases and tolerances -----------------------------------
# (The classes TestCUDAKernels of tests/ops, and the host execution harness,
# tests/cuda_host, which runs the same cases on the CPU.)

# The compiled bilinear against F.interpolate (the reference): the same
# formula, rounded differently in the last bit (FMA contraction).
CUDA_ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# The CUDA kernels against the CPU kernel. The CUDA kernels keep the bilinear
# weights in float, as PyTorch's CUDA upsample does; the CPU kernel rounds
# them to float16/bfloat16, as PyTorch's CPU upsample does: up to four
# weights off by half an ulp each (of values up to ~1.2 here), plus one
# rounding of the result. In float32, nvcc fuses scale * (x + 0.5) - 0.5
# into one FMA where the host compiler rounds twice: a source coordinate
# (below 64 here) one ulp apart moves a weight by up to 4e-6, per axis.
CROSS_ATOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


def assert_equal(got, want, name=""):
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    assert torch.equal(got.cpu(), want.cpu()), name


def assert_matches_cuda_reference(got, want, msg="", cancellation=False):
    """got against the reference run on CUDA tensors, whose F.interpolate
    computes the kernels' arithmetic (weights in float for 16-bit types): in
    16-bit types the two differ by at most one rounding of the result, an
    eps relative to it (also absolute where sums can cancel: compose's
    signed values and its + src)."""
    dtype = got.dtype
    if dtype in (torch.float16, torch.bfloat16):
        eps = torch.finfo(dtype).eps
        assert_close(got.cpu(), want.cpu(), eps if cancellation else 1e-6, rtol=eps, msg=msg)
    else:
        assert_close(got.cpu(), want.cpu(), CUDA_ATOL[dtype], msg=msg)


def assert_matches_cpu_kernel(got, want, msg=""):
    dtype = got.dtype
    assert_close(got.cpu(), want.cpu(), CROSS_ATOL[dtype], rtol=CROSS_ATOL[dtype], msg=msg)


def sampling_err(shape, dtype, kind):
    B, _, H, W = shape
    if kind == "random":
        err = torch.rand(shape) - 0.2
    elif kind == "ties":
        # Few distinct values: the k-th largest is shared by many cells,
        # spread over every block of the selection.
        err = torch.randint(-1, 3, shape).float() / 4
    else:  # "special": NaN, signed zeros, infinities, negative values
        err = torch.rand(shape) - 0.5
        flat = err.view(B, -1)
        n = flat.shape[1]
        flat[:, torch.randperm(n)[: max(1, n // 50)]] = float("nan")
        flat[:, torch.randperm(n)[: max(1, n // 10)]] = 0.0
        flat[:, torch.randperm(n)[: max(1, n // 10)]] = -0.0
        flat[:, torch.randperm(n)[: max(1, n // 100)]] = float("inf")
        flat[:, torch.randperm(n)[: max(1, n // 100)]] = float("-inf")
    return err.to(dtype)


def cuda_crop_case(B, dtype, layout, stride=2):
    """(inputs, idx, image size) of a crop on CUDA tensors: inputs resampled
    x4, by an odd ratio and /2, and read directly; idx with the corners and a
    repeated row."""
    from pymatting_ext import reference

    H, W = 44, 60
    hid = torch.rand(B, 5, 11, 15)          # resampled x4
    pha = torch.rand(B, 1, 11, 15)
    half = torch.rand(B, 2, 23, 29)         # resampled by an odd ratio
    src = torch.rand(B, 3, 88, 120)         # resampled /2
    same = torch.rand(B, 2, H, W)           # read directly
    inputs = [layouts(t.to(dtype).cuda(), layout) for t in (hid, pha, half, src, same)]
    hc, wc = -(-H // stride), -(-W // stride)
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, hc, wc), 37, False)
    idx = torch.cat([idx, torch.tensor([[0, 0, 0], [B - 1, hc - 1, wc - 1], [0, 3, wc - 1], [0, 3, wc - 1]])])
    return inputs, idx.cuda(), (H, W)


def crop_into_case(case, src, bgr, coarse):
    """(inputs, channels of out, channel offset, storage offset of out) of a
    crop_into case (also run on the host execution harness)."""
    return {
        # conv3's input: conv2's 16 channels, then [src, bgr] at [16, 22).
        "refiner": ([src, bgr], 22, 16, 0),
        "sixteen-byte runs": ([coarse, bgr[:, :2], src[:, 1:3]], 16, 8, 0),
        "odd runs": ([src, coarse], 12, 1, 0),
        "whole, aligned": ([coarse, src], 7, 0, 0),
        "whole, unaligned": ([coarse, src], 7, 0, 1),
        "refiner, unaligned": ([src, bgr], 22, 16, 1),
    }[case]


CROP_INTO_CASES = ["refiner", "sixteen-byte runs", "odd runs", "whole, aligned", "whole, unaligned",
                   "refiner, unaligned"]


def cuda_replace_case(B, C, H, W, P, s, dtype):
    """(x, patches, idx, valid) of a replace or compose on CUDA tensors, with
    duplicate cells."""
    x = torch.rand(B, C, H, W).to(dtype).cuda()
    patches = torch.rand(P, C, s, s).to(dtype).cuda()
    idx = torch.stack([torch.randint(0, B, (P,)), torch.randint(0, H // s, (P,)),
                       torch.randint(0, W // s, (P,))], 1)
    if P >= 3:
        idx[1] = idx[0]  # duplicate cells: the last valid patch wins
        idx[P - 1] = idx[0]
    valid = torch.rand(P) > 0.3
    if P >= 3:
        valid[P - 1] = False  # ... so here patch 1, unless it is invalid too
    return x, patches, idx.cuda(), valid.cuda()


# -- the CPU kernels' AVX2 paths (TestCPUVector in ops/test_crop.py and
# ops/test_compose_replace.py) ------------------------------------------------

def vector_crop_cases():
    """(name, inputs, idx, stride, padding, image_size, patch_size, channel_offset, out_channels):
    the refiner's crops at HD's and 4K's scales (x2 and x4 up, /2 down, the
    image's own size), odd sizes and patch shapes, patches across every edge,
    batch 2, channels-last and sliced inputs, and outputs large enough to
    be streamed (>= 4 MiB)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.rand(*s, generator=g)

    def idx_for(B, hc, wc, n):
        cells = torch.stack([torch.randint(0, B, (n,), generator=g), torch.randint(0, hc, (n,), generator=g),
                             torch.randint(0, wc, (n,), generator=g)], 1)
        corners = torch.tensor([[0, 0, 0], [B - 1, hc - 1, wc - 1], [0, 0, wc - 1], [B - 1, hc - 1, 0]])
        return torch.cat([cells, corners])

    out = []
    # The refiner at HD's scale: coarse at 1/4 (x2 up to 1/2), src at 1/1 (/2).
    B, H, W = 2, 68, 124
    hid, pha, src = r(B, 32, H // 4, W // 4), r(B, 1, H // 4, W // 4), r(B, 3, H, W)
    idx = idx_for(B, H // 4, W // 4, 60)
    out.append(("hd half", [hid, pha, src], idx, 2, 3, (H // 2, W // 2), None, 0, 36))
    out.append(("hd full into", [src], idx, 4, 2, (H, W), None, 5, 11))
    # 4K's scale: coarse at 1/8 (x4 up to 1/2).
    hid8 = r(B, 7, H // 8 + 1, W // 8 + 1)
    out.append(("x4 up", [hid8, src], idx, 2, 3, (H // 2, W // 2), None, 0, 10))
    # Odd sizes (not exact scales), wide patches with a remainder of columns,
    # channels-last and sliced inputs.
    a = r(B, 5, 13, 21).contiguous(memory_format=torch.channels_last)
    c = r(B, 9, 50, 70)[:, 1:8, 3:47, 5:66]
    d = r(B, 3, 44, 61)
    idx2 = idx_for(B, 11, 16, 40)
    out.append(("odd", [a, c, d], idx2, 4, 3, (44, 61), (11, 21), 0, 15))
    out.append(("odd into", [c, d], idx2, 4, 1, (44, 61), (6, 17), 2, 13))
    # A whole-image patch (full mode): tiles of 16 x 64 over it.
    out.append(("whole", [r(1, 4, 30, 40), r(1, 2, 120, 160)], torch.tensor([[0, 0, 0]]), 1, 3, (60, 80),
                (66, 86), 0, 6))
    # Many patches: 500 x 42 x 8 x 8 floats is over 4 MiB (streamed out); the
    # cases above are under it.
    H, W = 120, 200
    big = [r(1, 32, H // 4, W // 4), r(1, 1, H // 4, W // 4), r(1, 3, H // 4, W // 4), r(1, 3, H, W),
           r(1, 3, H, W)]
    out.append(("streamed", big, idx_for(1, H // 4, W // 4, 500), 2, 3, (H // 2, W // 2), None, 0, 42))
    # Channels-last inputs (read a pixel's channels at a time): the coarse
    # inputs as a channels-last base network gives them (views of one
    # 37-channel output: hid's runs of 8 channels, pha and fgr one run of 4),
    # src and bgr planar or channels-last (a run of 3 channels each), the
    # full-resolution crop (no resampling), x4 up, and a source mixing
    # planar and channels-last planes.
    B, H, W = 2, 68, 124
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    x37 = cl(r(B, 37, H // 4, W // 4))
    coarse = [x37[:, 5:], x37[:, 0:1], x37[:, 1:4]]
    src, bgr = r(B, 3, H, W), r(B, 3, H, W)
    idx = idx_for(B, H // 4, W // 4, 60)
    out.append(("cl coarse", coarse + [src, bgr], idx, 2, 3, (H // 2, W // 2), None, 0, 42))
    out.append(("cl all", coarse + [cl(src), cl(bgr)], idx, 2, 3, (H // 2, W // 2), None, 0, 42))
    out.append(("cl full into", [cl(src), cl(bgr)], idx, 4, 2, (H, W), None, 3, 11))
    out.append(("cl x4 up", [cl(r(B, 11, H // 8 + 1, W // 8 + 1)), cl(src)], idx, 2, 3, (H // 2, W // 2), None,
                0, 14))
    # merge_cells' tiles of 4 x 4 cells: 14 x 14 patches (a block of 8 and
    # the portable loops' 6 columns), stride 8.
    out.append(("cl tiles", coarse + [src, bgr], idx_for(B, H // 16, W // 16, 20), 8, 3, (H // 2, W // 2), None, 0,
                42))
    out.append(("cl mixed", [cl(r(B, 5, H // 4, W // 4)), r(B, 2, H // 4, W // 4), x37[:, 30:], src], idx, 2, 3,
                (H // 2, W // 2), None, 0, 17))
    # Many patches with channels-last coarse inputs: streamed out.
    H, W = 120, 200
    x37 = cl(r(1, 37, H // 4, W // 4))
    big = [x37[:, 5:], x37[:, 0:1], x37[:, 1:4], r(1, 3, H, W), r(1, 3, H, W)]
    out.append(("cl streamed", big, idx_for(1, H // 4, W // 4, 500), 2, 3, (H // 2, W // 2), None, 0, 42))
    return out


def vector_compose_cases():
    """(name, coarse, patches, idx, valid, size, src, out_offset): compose's
    upsample at HD's and 4K's scales (x4, x8), odd sizes and scales (blocks
    of 8 columns reading more than 8 coarse columns, remainder columns), a
    strided coarse map and src, the epilogue with values outside [0, 1] and
    NaN, invalid patches, batch 2, and outputs large enough to be streamed
    (>= 4 MiB), one of them at an unaligned address (out_offset elements
    into its storage)."""
    g = torch.Generator().manual_seed(1)

    def case(name, B, C, hc, wc, H, W, s, n, *, src=False, strided=False, offset=0):
        coarse = torch.randn(B, C, hc, wc, generator=g)
        if strided:
            coarse = torch.randn(B, C, hc, 2 * wc, generator=g)[..., ::2]
        cells = torch.stack([torch.randint(0, B, (n,), generator=g), torch.randint(0, H // s, (n,), generator=g),
                             torch.randint(0, W // s, (n,), generator=g)], 1)
        patches = torch.randn(n, C, s, s, generator=g) * 2
        patches[0, 0, 0, 0] = float("nan")
        valid = torch.rand(n, generator=g) > 0.2
        image = None
        if src:
            image = torch.rand(B, C - 1, H, 2 * W if strided else W, generator=g)
            image = image[..., ::2] if strided else image
        return (name, coarse, patches, cells, valid, (H, W), image, offset)

    return [
        case("x4", 2, 4, 17, 30, 68, 120, 4, 50),
        case("x4 matting", 2, 4, 17, 30, 68, 120, 4, 50, src=True),
        case("x8 odd", 1, 3, 9, 14, 72, 108, 4, 30, src=True),
        case("odd scale", 1, 2, 23, 41, 30, 52, 2, 40),
        case("near 1:1", 1, 2, 23, 56, 30, 52, 2, 40),
        case("down", 2, 3, 40, 90, 30, 52, 2, 40, src=True),
        case("strided", 2, 4, 17, 30, 68, 120, 4, 50, src=True, strided=True),
        case("streamed", 1, 4, 136, 121, 544, 484, 4, 900, src=True),
        case("streamed unaligned", 2, 4, 68, 123, 272, 492, 4, 400, offset=3),
    ]


def vector_crop_results():
    """{name: output} of crop and crop_into on the CPU backend, for every
    vector_crop_cases() case."""
    import pymatting_ext as pm

    results = {}
    for name, inputs, idx, stride, padding, size, patch, offset, channels in vector_crop_cases():
        ph, pw = patch or (stride + 2 * padding,) * 2
        results[name + " crop"] = pm.crop(inputs, idx, stride, padding, size, patch, backend="cpu")
        into = torch.full((idx.shape[0], channels, ph, pw), float("nan"))
        into = into.contiguous(memory_format=torch.channels_last)
        pm.crop_into(inputs, idx, stride, padding, size, offset, into, backend="cpu")
        results[name + " crop_into"] = into
    return results


def vector_compose_results():
    """{name: output} of compose and compose_into on the CPU backend, for
    every vector_compose_cases() case."""
    import pymatting_ext as pm

    results = {}
    for name, coarse, patches, idx, valid, size, src, offset in vector_compose_cases():
        results[name + " compose"] = pm.compose(coarse, patches, idx, valid, size, src, backend="cpu")
        shape = (coarse.shape[0], coarse.shape[1]) + tuple(size)
        storage = torch.full((offset + torch.Size(shape).numel(),), float("nan"))
        into = storage[offset:].view(shape)
        pm.compose_into(coarse, patches, idx, valid, src, into, backend="cpu")
        results[name + " compose_into"] = into.clone()
    return results


def check_vector_paths_match_portable_loops(results):
    """The function `results` (vector_crop_results or vector_compose_results)
    gives the same bits here (the vector paths wherever the CPU has AVX2) as
    in a subprocess with PYMATTING_EXT_CPU_CAPABILITY=default (the portable
    loops only, read once per process like ATen's ATEN_CPU_CAPABILITY): both
    paths do the same operations in the same order."""
    import pickle
    import subprocess

    here = results()
    env = subprocess_env(PYMATTING_EXT_CPU_CAPABILITY="default")
    code = ("import pickle, sys, helpers; "
            f"sys.stdout.buffer.write(pickle.dumps({{k: v.numpy() for k, v in helpers.{results.__name__}().items()}}))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, cwd=TESTS_DIR, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    there = pickle.loads(done.stdout)
    assert set(here) == set(there)
    for name, got in here.items():
        want = torch.from_numpy(there[name])
        assert torch.equal(got.isnan(), want.isnan()), name
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), name


# -- hypothesis ------------------------------------------------------------------

def load_hypothesis_profile():
    """The property tests' budget (HYPOTHESIS_PROFILE: 'ci' by default,
    derandomized so that CI is repeatable; 'dev' explores more, with fresh
    randomness). A failure prints the falsifying example and the blob to
    reproduce it."""
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("dev", max_examples=400, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
