"""The fused eval-mode sparse refiner (pymatting_ext._fused.refine_sparse,
kernels/triton/fused.py) against the reference refiner and upstream's
Refiner with the same weights: sampling (prevent_oversampling on and off)
and thresholding, kernel_size 1 and 3, batch > 1, odd sizes, ties, float32
(TF32 off: conftest) and float16/bfloat16, with and without MattingRefine's
epilogue; opcheck of the registered op; bad input. Without a GPU every case
runs through Triton's interpreter on CPU tensors (small sizes: the
interpreter is slow); with one, on the GPU, where the GPU-only tests below
also run (no synchronisation, CUDA graphs, TF32, 2^31 elements).

tests/build_checks/test_triton_compile.py compiles the kernels ahead of time for sm_90
(no GPU needed): every variant these tests launch on a GPU, with their
registers, spills, shared memory and per-tap layout conversions."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import pymatting_ext as pm  # noqa: E402
from pymatting_ext import _backend, reference  # noqa: E402

from conftest import needs_cuda  # noqa: E402
from helpers import check_outputs, quarter_err, random_bn_, refiner_inputs  # noqa: E402

Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner

#: Where the fused kernels run: the GPU if there is one, else the CPU through
#: Triton's interpreter (conftest sets TRITON_INTERPRET=1 there).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _available():
    try:
        _backend.resolve("triton", torch.device(DEVICE))
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return ""


pytestmark = pytest.mark.skipif(bool(_available()), reason=_available() or "ok")

#: Documented tolerances of the fused path against the float32 reference
#: (on the same rounded inputs, weights and cells), relative to max(1, |out|):
#: float32 (TF32 off) as DESIGN's yardstick; float16 and bfloat16 round the
#: samples, weights and each layer's activations to their 11 and 8 bits.
ATOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def fused():
    from pymatting_ext import _fused
    return _fused


def make(mode, sample_pixels=16 * 24, threshold=0.5, kernel_size=3, prevent=True):
    """An upstream Refiner with random BatchNorm and ours (backend
    'reference') with its state_dict, both eval."""
    up = random_bn_(Upstream(mode, sample_pixels, threshold, kernel_size, prevent)).eval()
    ours = pm.Refiner(mode, sample_pixels, threshold, kernel_size, prevent, backend="reference").eval()
    ours.load_state_dict(up.state_dict())
    return up, ours


def select(model, err, H, W):
    """(ref, idx, valid) as the eval Refiner selects them."""
    err_q = quarter_err(err, H, W)
    if model.mode == "sampling":
        k = min(model.sample_pixels // 16, (H // 4) * (W // 4))
        return reference.select_sampling(err_q, k, model.prevent_oversampling)
    ref, idx = reference.select_thresholding(err_q, model.threshold)
    return ref, idx, None


def run_fused(model, src, bgr, pha, fgr, err, hid, epilogue=False, dtype=None, **kw):
    """The eval sparse Refiner through the fused op: (pha, fgr, ref). With
    dtype, the inputs and folded weights are rounded to it (the cells are
    chosen on the float32 error map)."""
    H, W = src.shape[2:]
    ref, idx, valid = select(model, err, H, W)
    folded = model._folded()
    x = (src, bgr, pha, fgr, hid)
    if dtype is not None:
        x = [t.to(dtype) for t in x]
        folded = [w.to(dtype) for w in folded]
    out = fused().refine_sparse(*x, idx, valid, folded, model.kernel_size, epilogue, **kw)
    assert out.is_contiguous() and out.shape == (src.shape[0], 4, H, W)
    return out[:, :1], out[:, 1:], ref


def to(device, *ts):
    return [t.to(device) for t in ts]


# -- against the reference and upstream -------------------------------------------

CASES = [  # (mode, prevent_oversampling)
    ("sampling", True), ("sampling", False), ("thresholding", True)]


@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("mode,prevent", CASES)
def test_matches_reference_and_upstream(mode, prevent, kernel_size):
    up, ours = make(mode, kernel_size=kernel_size, prevent=prevent)
    B, H, W, Hc, Wc = 2, 40, 56, 10, 14
    x = refiner_inputs(B, H, W, Hc, Wc)
    if prevent:
        # Zero error but in the last row: most selected cells are invalid
        # and keep the coarse upsample (upstream's topk picks among the
        # tied zeros, which are not refined either).
        x[4][:, :, :9] = 0
    with torch.no_grad():
        want_up = up(*x)
        want_ref = reference.refine(ours, *x)
        up.to(DEVICE), ours.to(DEVICE)
        got = [t.cpu() for t in run_fused(ours, *to(DEVICE, *x))]
    check_outputs(want_ref, got)
    check_outputs(want_up, got)
    if mode == "sampling" and prevent:
        assert not bool(select(ours.cpu(), x[4], H, W)[2].all()), "no invalid cell exercised"


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_odd_sizes_ties_and_the_epilogue(kernel_size):
    # H, W multiples of 4 but not 8, coarse sizes that divide neither H/2
    # nor H/4, and an error map of a few levels: ties at the k-th value,
    # broken to the lower flat index (the reference's rule; upstream's topk
    # breaks them arbitrarily, so it is left out).
    _, ours = make("sampling", 16 * 20, kernel_size=kernel_size, prevent=True)
    B, H, W, Hc, Wc = 3, 36, 52, 7, 11
    x = list(refiner_inputs(B, H, W, Hc, Wc))
    x[4] = (x[4] * 4).floor() / 4
    with torch.no_grad():
        want = ours.forward_matting(*x)
        want_plain = ours(*x)
        ours.to(DEVICE)
        got = [t.cpu() for t in run_fused(ours, *to(DEVICE, *x), epilogue=True)]
        got_plain = [t.cpu() for t in run_fused(ours, *to(DEVICE, *x))]
    check_outputs(want, got)
    check_outputs(want_plain, got_plain)
    assert float(got[0].min()) >= 0 and float(got[1].max()) <= 1


def test_coarse_the_same_size_as_half_resolution():
    # backbone_scale 0.5: the coarse maps are cropped without resampling.
    up, ours = make("thresholding", kernel_size=3)
    x = refiner_inputs(1, 32, 48, 16, 24)
    with torch.no_grad():
        want = up(*x)
        up.to(DEVICE), ours.to(DEVICE)
        got = [t.cpu() for t in run_fused(ours, *to(DEVICE, *x))]
    check_outputs(want, got)


@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype, kernel_size):
    # Against the float32 reference on the same rounded inputs and weights.
    _, ours = make("sampling", 16 * 20, kernel_size=kernel_size, prevent=False)
    x = refiner_inputs(2, 40, 56, 10, 14)
    x = [t.to(dtype).float() for t in x]
    with torch.no_grad():
        want = ours.forward_matting(*x)
        ours.to(DEVICE)
        got = run_fused(ours, *to(DEVICE, *x), epilogue=True, dtype=dtype)
    assert got[0].dtype == got[1].dtype == dtype
    check_outputs(want, [got[0].cpu().float(), got[1].cpu().float(), got[2].cpu()], atol=ATOL[dtype])


def test_valid_none_duplicates_and_no_cells():
    _, ours = make("sampling", kernel_size=3)
    B, H, W = 2, 24, 32
    src, bgr, pha, fgr, err, hid = x = refiner_inputs(B, H, W, 6, 8)
    f = fused()
    with torch.no_grad():
        # valid None: every row refined; a repeated row writes the same cell.
        idx = torch.tensor([[0, 0, 0], [1, 5, 7], [0, 2, 3], [1, 5, 7], [0, 5, 0]])
        patches = ours._patches("reference", idx, *x[:4], hid, ours._folded())
        want = reference.compose(torch.cat([pha, fgr], 1), patches, idx, None, (H, W))
        got = f.refine_sparse(*to(DEVICE, src, bgr, pha, fgr, hid, idx), None,
                              [w.to(DEVICE) for w in ours._folded()], 3).cpu()
        assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))
        # No cell at all: the coarse upsample (with the epilogue).
        none = torch.zeros((0, 3), dtype=torch.long)
        want = reference.compose(torch.cat([pha, fgr], 1), patches[:0], none, None, (H, W), src)
        got = f.refine_sparse(*to(DEVICE, src, bgr, pha, fgr, hid, none), None,
                              [w.to(DEVICE) for w in ours._folded()], 3, True).cpu()
        assert float((got - want).abs().max()) <= 1e-6


# -- the registered op ------------------------------------------------------------

def op_args(kernel_size, dtype=torch.float32, B=2, H=24, W=32, Hc=6, Wc=8, P=5):
    g = torch.Generator().manual_seed(1)
    src, bgr, pha, fgr, err, hid = refiner_inputs(B, H, W, Hc, Wc, DEVICE, dtype)
    idx = torch.stack([torch.randint(0, B, (P,), generator=g), torch.randint(0, H // 4, (P,), generator=g),
                       torch.randint(0, W // 4, (P,), generator=g)], 1).to(DEVICE)
    valid = (torch.arange(P) % 3 != 1).to(DEVICE)
    model = random_bn_(pm.Refiner("sampling", 100, 0.1, kernel_size)).eval().to(DEVICE, dtype)
    with torch.no_grad():
        weights = [w.clone() for w in model._folded()]
    return [src, bgr, pha, fgr, hid, idx, valid, weights, kernel_size, False, True]


@pytest.mark.parametrize("kernel_size,dtype,with_valid", [
    (3, torch.float32, True), (1, torch.bfloat16, True), (1, torch.float32, False)])
def test_opcheck(kernel_size, dtype, with_valid):
    fused()
    args = op_args(kernel_size, dtype, P=4)
    if not with_valid:
        args[6] = None
    result = torch.library.opcheck(torch.ops.pymatting_ext_fused.refine_sparse.default, args,
                                   test_utils=("test_schema", "test_faketensor"))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_sees_one_op():
    torch._dynamo.reset()
    f = fused()
    args = op_args(1, P=4)

    def run(src, bgr, pha, fgr, hid, idx, valid, weights):
        out = f.refine_sparse(src, bgr, pha, fgr, hid, idx, valid, weights, 1, True, allow_tf32=False)
        return out[:, :1], out[:, 1:]

    eager = run(*args[:8])
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(*args[:8])
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# -- bad input --------------------------------------------------------------------

def _bad(i, value):
    def edit(args):
        args[i] = value(args) if callable(value) else value
    return edit


BAD = [
    ("src", _bad(0, lambda a: a[0][0]), "src must be 4-D"),
    ("hid", _bad(4, lambda a: a[4][:, :16]), "hid must have shape"),
    ("bgr", _bad(1, lambda a: a[1].double()), "bgr has dtype"),
    ("size", lambda a: a.__setitem__(slice(0, 2), [a[0][:, :, :22], a[1][:, :, :22]]), "multiples of 4"),
    ("float64", lambda a: a.__setitem__(slice(0, 5), [t.double() for t in a[:5]]), "float32, float16 or bfloat16"),
    ("idx", _bad(5, lambda a: a[5].int()), "idx must be an int64 tensor"),
    ("idx", _bad(5, lambda a: a[5][:, :2]), "idx must be an int64 tensor"),
    ("valid", _bad(6, lambda a: a[6][:-1]), "valid must be a bool tensor"),
    ("valid", _bad(6, lambda a: a[6].float()), "valid must be a bool tensor"),
    ("weights", _bad(7, lambda a: a[7][:7]), "weights must be the 8"),
    ("w3", _bad(7, lambda a: a[7][:4] + [a[7][4][:, :20]] + a[7][5:]), r"weights\[w3\] must have shape"),
    ("b2", _bad(7, lambda a: a[7][:3] + [a[7][3].half()] + a[7][4:]), r"weights\[b2\] must be"),
    ("kernel_size", _bad(8, 2), "kernel_size must be 1 or 3"),
]


@pytest.mark.parametrize("name,edit,message", BAD, ids=[b[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, edit, message):
    f = fused()
    args = op_args(3)
    edit(args)
    src, bgr, pha, fgr, hid, idx, valid, weights, k, allow_tf32, epilogue = args
    with pytest.raises(ValueError, match=message):
        f.refine_sparse(src, bgr, pha, fgr, hid, idx, valid, weights, k, epilogue, allow_tf32=allow_tf32)


def test_out_of_range_idx():
    f = fused()
    src, bgr, pha, fgr, hid, idx, valid, weights, k, _, epilogue = op_args(1)
    idx = idx.clone()
    idx[2, 1] = 6  # H / 4 = 6 rows of cells
    with pytest.raises(ValueError, match=r"idx row 2 = \(.*\) is out of range"):
        f.refine_sparse(src, bgr, pha, fgr, hid, idx, valid, weights, k, epilogue, check_indices=True)
    # Unchecked, the row is skipped: nothing is written for it (no wrap into
    # a neighbouring row or image), every cell no other row names keeps the
    # coarse upsample.
    out = f.refine_sparse(src, bgr, pha, fgr, hid, idx, None, weights, k, False)
    coarse = F.interpolate(torch.cat([pha, fgr], 1), src.shape[2:], mode="bilinear", align_corners=False)
    assert bool(out.isfinite().all())
    cells = {tuple(r) for i, r in enumerate(idx.tolist()) if i != 2}
    for b in range(src.shape[0]):
        for cy in range(6):
            for cx in range(8):
                block = (b, slice(None), slice(4 * cy, 4 * cy + 4), slice(4 * cx, 4 * cx + 4))
                if (b, cy, cx) not in cells:
                    assert float((out[block] - coarse[block]).abs().max()) <= 1e-6, (b, cy, cx)


# -- GPU only ---------------------------------------------------------------------

def _sampling_on_gpu(dtype=torch.float32, size=(1, 1080, 1920, 270, 480), pixels=80_000, prevent=True):
    B, H, W, Hc, Wc = size
    model = random_bn_(pm.Refiner("sampling", pixels, 0.1, 3, prevent, backend="reference")).cuda().to(dtype).eval()
    return model, refiner_inputs(B, H, W, Hc, Wc, "cuda", dtype)


def _fused_sampling(model, src, bgr, pha, fgr, err, hid):
    """select (the Refiner's backend for CUDA tensors) + the fused op, as the
    eval sampling Refiner will run them."""
    H, W = src.shape[2:]
    err_q = F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)
    k = min(model.sample_pixels // 16, (H // 4) * (W // 4))
    ref, idx, valid = pm.select_sampling(err_q, k, model.prevent_oversampling)
    out = fused().refine_sparse(src, bgr, pha, fgr, hid, idx, valid, model._folded(), 3)
    return out, ref


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gpu_matches_reference_at_hd(dtype):
    model, x = _sampling_on_gpu(dtype)
    with torch.inference_mode():
        out, ref = _fused_sampling(model, *x)
        want = model(*x)
    got = (out[:, :1], out[:, 1:], ref)
    check_outputs(tuple(t.float() for t in want[:2]) + (want[2],), (got[0].float(), got[1].float(), got[2]),
                  atol=ATOL[dtype] if dtype != torch.float32 else 1e-5)


@needs_cuda
def test_gpu_tf32_when_allowed():
    model, x = _sampling_on_gpu(size=(2, 256, 384, 64, 96), pixels=8000)
    with torch.inference_mode():
        want = model(*x)
        H, W = x[0].shape[2:]
        _, idx, valid = pm.select_sampling(quarter_err(x[4], H, W), 500, True)
        out = fused().refine_sparse(*x[:4], x[5], idx, valid, model._folded(), 3, allow_tf32=True)
    # TF32 keeps 10 mantissa bits of each product's inputs.
    bound = 5e-3 * max(1.0, float(want[1].abs().max()))
    assert float((out[:, 1:] - want[1]).abs().max()) <= bound


@needs_cuda
@pytest.mark.parametrize("prevent", [True, False])
def test_gpu_sampling_never_synchronises_and_captures_in_a_cuda_graph(prevent):
    model, static = _sampling_on_gpu(size=(2, 256, 384, 64, 96), pixels=5000, prevent=prevent)
    static = [t.clone() for t in static]
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the kernels, fills the fold cache
                _fused_sampling(model, *static)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _fused_sampling(model, *static)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured, captured_ref = _fused_sampling(model, *static)
    for _ in range(2):
        fresh = refiner_inputs(2, 256, 384, 64, 96, "cuda")
        fresh[4][:, :, :20] = 0  # invalid cells
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        with torch.inference_mode():
            want = model(*fresh)
        check_outputs(want, (captured[:, :1], captured[:, 1:], captured_ref))


@needs_cuda
def test_gpu_past_2_to_the_31_elements():
    # float16, B = 1: hid (32, H/2, W/2) and out (4, H, W) have more than
    # 2^31 elements, so 32-bit offsets would wrap. The cells are in the last
    # rows; the coarse maps are at half resolution (no resampling), so a cell
    # depends on a local window only and the same problem cut to the last 64
    # rows gives the expected values.
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2 ** 30:.1f} free")
    H, W = 32768, 16392
    dtype = torch.float16
    model = random_bn_(pm.Refiner("sampling", 100, 0.1, 3, backend="reference")).cuda().to(dtype).eval()
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, device="cuda", dtype=dtype, generator=g)

    src, bgr = rand(1, 3, H, W), rand(1, 3, H, W)
    pha, fgr, hid = rand(1, 1, H // 2, W // 2), rand(1, 3, H // 2, W // 2), rand(1, 32, H // 2, W // 2)
    assert hid.numel() > 2 ** 31
    P = 48
    idx = torch.stack([torch.zeros(P, dtype=torch.long), torch.randint(H // 4 - 8, H // 4, (P,)),
                       torch.randint(0, W // 4, (P,))], 1).cuda()
    with torch.inference_mode():
        out = fused().refine_sparse(src, bgr, pha, fgr, hid, idx, None, model._folded(), 3, True)
        assert out.numel() > 2 ** 31
        got = out[:, :, H - 64:].clone()
        del out
        cut = (src[:, :, H - 64:], bgr[:, :, H - 64:], pha[:, :, H // 2 - 32:], fgr[:, :, H // 2 - 32:],
               hid[:, :, H // 2 - 32:])
        local = idx.clone()
        local[:, 1] -= (H - 64) // 4
        want = fused().refine_sparse(*[t.contiguous() for t in cut], local, None, model._folded(), 3, True)
        reference_out = reference.compose(torch.cat(cut[2:4], 1), model._patches(
            "reference", local, *cut, model._folded()), local, None, (64, W), cut[0])
    # Rows 4.. of the cut: away from its top edge (zeros above it in the cut).
    assert torch.equal(got[:, :, 8:], want[:, :, 8:])
    bound = ATOL[dtype] * max(1.0, float(reference_out.float().abs().max()))
    assert float((want[:, :, 8:].float() - reference_out[:, :, 8:].float()).abs().max()) <= bound


# -- launch options ---------------------------------------------------------------

def test_launches_pin_enable_fp_fusion_off(monkeypatch):
    # NB: off (common.FP_FUSION, as the op set's launches), so that the
    # compiled kernels round each product and sum of the crop, the biases
    # and the epilogue as Triton's interpreter, which runs these tests
    # without a GPU, does: contracted into FMAs they would differ by an ulp
    # here and there, as the Triton version's LLVM chose.
    # tests/build_checks/test_triton_compile.py checks that the compiled PTX then holds
    # no contracted FMA.
    from pymatting_ext.triton_kernels import fused as k
    assert k.FP_FUSION is False
    seen = []
    wrap = k.wrap_triton

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = wrap(self.kernel)[grid]

            def run(*args, **kwargs):
                seen.append((self.kernel.fn.__name__, kwargs.get("enable_fp_fusion", "not given")))
                return launch(*args, **kwargs)
            return run

    monkeypatch.setattr(k, "wrap_triton", Spy)
    src, bgr, pha, fgr, hid, idx, valid, weights, ks, allow_tf32, epilogue = op_args(1, P=2)
    fused().refine_sparse(src, bgr, pha, fgr, hid, idx, valid, weights, ks, epilogue, allow_tf32=allow_tf32)
    assert seen == [("_refine_kernel", False), ("_coarse_kernel", False)]


def test_warmup_runs_float32_with_tf32_on_and_off(monkeypatch):
    # The fused kernel compiles one variant per tl.dot precision: warmup
    # runs float32 under both settings of allow_tf32 (the tests turn it off,
    # PyTorch's default is on) and restores the caller's.
    from pymatting_ext import _warmup
    seen = set()

    class Spy(pm.Refiner):
        def forward(self, *args, **kwargs):
            seen.add(torch.backends.cudnn.allow_tf32)
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(_warmup, "Refiner", Spy)
    before = torch.backends.cudnn.allow_tf32
    pm.warmup(DEVICE, torch.float32, modes=("sampling",), epilogue=False)
    assert seen == {True, False}
    assert torch.backends.cudnn.allow_tf32 == before
