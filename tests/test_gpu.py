"""GPU-only checks of the compiled GPU backends ('cuda' and 'triton') at the
refiner's real sizes, beyond the op-by-op tests of test_ops.py and
test_cuda.py: the Refiner against upstream on the same GPU at HD and 4K,
streams, the int64 index paths, selection edge cases, non-contiguous idx and
valid, host synchronisation, CUDA graphs, Triton's caches over a video's
frames, and determinism.

Everything here skips without a GPU. tests/gpu_check.sh runs it on the GPU
machine."""
import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import _backend, reference

from helpers import check_refiner_in_a_cuda_graph, check_tie_tolerant, op_calls, random_bn_, refiner_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner


def gpu_backends():
    """'cuda' and 'triton', each skipped with the reason where it cannot run."""
    cases = []
    for backend in ("cuda", "triton"):
        marks = []
        if torch.cuda.is_available():
            try:
                _backend.resolve(backend, torch.device("cuda"), torch.float32)
            except (ValueError, RuntimeError) as exc:
                if backend == "cuda":
                    # A GPU but no CUDA kernels: the build is broken.
                    marks.append(pytest.mark.xfail(reason=str(exc), strict=True))
                else:
                    marks.append(pytest.mark.skip(reason=str(exc)))
        cases.append(pytest.param(backend, marks=marks, id=backend))
    return cases


BACKENDS = gpu_backends()
#: The Refiner's ways on a GPU: 'triton' runs the fused patch kernel in eval
#: mode (fused=None), 'triton-unfused' the Triton op set (fused=False).
REFINER_BACKENDS = BACKENDS + [pytest.param("triton-unfused", marks=BACKENDS[1].marks, id="triton-unfused")]


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


# -- the Refiner against upstream at the real sizes ---------------------------

@pytest.mark.parametrize("backend", REFINER_BACKENDS)
# NB: 4K with batch 4 is the heaviest case; the GPU check runs it last.
@pytest.mark.parametrize("setting,B", [(HD, 1), (HD, 4), (UHD, 1),
                                       pytest.param(UHD, 4, marks=pytest.mark.gpu_extra)],
                         ids=["HD-1", "HD-4", "4K-1", "4K-4"])
@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_refiner_matches_upstream_at_real_sizes(backend, setting, B, kernel_size, dtype):
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


@pytest.mark.parametrize("backend", REFINER_BACKENDS)
@pytest.mark.parametrize("mode", ["thresholding", "full"])
def test_refiner_other_modes_match_upstream_at_hd(backend, mode):
    H, W, scale, pixels = HD
    up, ours = models(mode, pixels, 3, True, backend, torch.float32, threshold=0.7)
    x = refiner_inputs(1, H, W, int(H * scale), int(W * scale), "cuda")
    with torch.inference_mode():
        want, got = up(*x), ours(*x)
    assert torch.equal(want[2], got[2])
    for u, o in zip(want[:2], got[:2]):
        assert float((u - o).abs().max()) <= 1e-5 * max(1.0, float(u.abs().max()))


# -- streams -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_every_op_runs_on_the_current_stream(backend):
    # The default stream is kept busy; each op launched on a side stream must
    # finish there, without waiting for the default stream, and read and
    # write nothing the default stream has not finished with.
    for name, call in op_calls(backend, "cuda").items():
        want = [t.clone() for t in call()]
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        torch.cuda._sleep(200_000_000)  # ~0.1 s on the default stream
        with torch.cuda.stream(side):
            got = [t.clone() for t in call()]
        side.synchronize()
        assert not main.query(), f"{name}: the op waited for the default stream"
        for g, w in zip(got, want):
            assert torch.equal(g, w), name
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_selects_on_two_streams_at_once(backend):
    errs = [torch.rand(2, 1, 270, 480, device="cuda") for _ in range(2)]
    want = [pm.ops.run_select_sampling("cpu", e.cpu(), 5000, True) for e in errs]
    streams = [torch.cuda.Stream() for _ in range(2)]
    for _ in range(5):
        torch.cuda.synchronize()
        got = []
        for e, s in zip(errs, streams):
            with torch.cuda.stream(s):
                got.append(pm.ops.run_select_sampling(backend, e, 5000, True))
        torch.cuda.synchronize()
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                assert torch.equal(a.cpu(), b)


# -- int64 index paths -----------------------------------------------------------

def big_free_memory(gib):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2 ** 30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2 ** 30:.1f} free")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_past_2_to_the_31_elements(backend):
    # fp16 tensors of more than 2^31 elements: 32-bit offsets would wrap.
    big_free_memory(24)
    H, W = 32768, 16392  # 4 * H * W > 2^31
    coarse = torch.rand(1, 4, H // 64, W // 64, device="cuda", dtype=torch.float16)
    P = 64
    cells = torch.stack([torch.zeros(P, dtype=torch.long), torch.randint(H // 4 - 8, H // 4, (P,)),
                         torch.randint(0, W // 4, (P,))], 1).cuda()
    patches = torch.rand(P, 4, 4, 4, device="cuda", dtype=torch.float16)
    out = pm.ops.run_compose(backend, coarse, patches, cells, None, (H, W))
    assert out.numel() > 2 ** 31
    # The last rows (all past 2^31) against the reference on those rows.
    rows = slice(H - 64, H)
    want = F.interpolate(coarse.float(), (H, W), mode="bilinear", align_corners=False)[:, :, rows].half()
    got = out[:, :, rows].clone()
    del out
    owner = reference.cell_owner(cells, None, 1, H // 4, W // 4)[:, (H - 64) // 4:]
    for p in range(P):
        y, x = int(cells[p, 1]) - (H - 64) // 4, int(cells[p, 2])
        if int(owner[0, y, x]) == p:
            want[0, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4] = patches[p]
    assert float((got.float() - want.float()).abs().max()) <= 2e-3
    del got, want

    x = torch.rand(1, 4, H, W, device="cuda", dtype=torch.float16)
    out = pm.ops.run_replace(backend, x, patches, cells, None)
    for p in range(P):
        y, xc = int(cells[p, 1]), int(cells[p, 2])
        block = out[0, :, 4 * y:4 * y + 4, 4 * xc:4 * xc + 4]
        assert torch.equal(block, patches[p]) == (int(owner[0, y - (H - 64) // 4, xc]) == p), p
    # The cells are in the last 32 rows: everything above is x's.
    assert torch.equal(out[:, :, :H - 32], x[:, :, :H - 32])
    del out

    # crop reading past 2^31 (no resampling: a plain copy of each window,
    # zeros outside the image).
    got = pm.ops.run_crop(backend, [x], cells, 4, 2, (H, W))
    region = F.pad(x[0, :, H - 40:], (2, 2, 2, 2))  # region row r = image row H - 40 + r - 2
    for p in range(P):
        y0, x0 = 4 * int(cells[p, 1]) - 2, 4 * int(cells[p, 2]) - 2
        r0 = y0 - (H - 40) + 2
        assert torch.equal(got[p], region[:, r0:r0 + 8, x0 + 2:x0 + 10]), p


# -- selection edge cases --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", ["nan", "-inf", "zero", "one_value"])
@pytest.mark.parametrize("k_from_end", [0, 1, 5000])
@pytest.mark.parametrize("prevent", [True, False])
def test_select_sampling_edge_cases_at_refiner_size(backend, fill, k_from_end, prevent):
    shape = (2, 1, 270, 480)
    N = 270 * 480
    value = {"nan": float("nan"), "-inf": float("-inf"), "zero": 0.0, "one_value": 0.25}[fill]
    err = torch.full(shape, value)
    if fill == "one_value":
        err.view(2, -1)[:, ::97] = 0.5
    k = N - k_from_end if k_from_end < 5000 else 5000
    for dtype in (torch.float32, torch.float16):
        e = err.to(dtype)
        got = pm.ops.run_select_sampling(backend, e.cuda(), k, prevent)
        want = pm.ops.run_select_sampling("cpu", e, k, prevent)
        for g, w, name in zip(got, want, ("ref", "idx", "valid")):
            assert torch.equal(g.cpu(), w), (name, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_thresholding_edge_cases(backend):
    for value in (float("nan"), float("-inf"), 0.0, float("inf")):
        err = torch.full((2, 1, 270, 480), value)
        got = pm.ops.run_select_thresholding(backend, err.cuda(), 0.1)
        want = pm.ops.run_select_thresholding("cpu", err, 0.1)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), value


# -- non-contiguous idx and valid ------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_idx_and_valid(backend):
    err = torch.rand(2, 1, 30, 40, device="cuda")
    _, idx, valid = reference.select_sampling(err, 200, True)
    wide = torch.zeros(idx.shape[0], 5, dtype=torch.long, device="cuda")
    wide[:, 1:4] = idx
    idx_nc = wide[:, 1:4]                       # rows of stride 5
    idx_t = idx.t().contiguous().t()            # column-major
    twice = torch.zeros(2 * valid.shape[0], dtype=torch.bool, device="cuda")
    twice[::2] = valid
    valid_nc = twice[::2]
    assert not idx_nc.is_contiguous() and not idx_t.is_contiguous() and not valid_nc.is_contiguous()
    hid, src = torch.rand(2, 8, 15, 20, device="cuda"), torch.rand(2, 3, 120, 160, device="cuda")
    coarse, x = torch.rand(2, 4, 30, 40, device="cuda"), torch.rand(2, 4, 120, 160, device="cuda")
    patches = torch.rand(idx.shape[0], 4, 4, 4, device="cuda")
    for i in (idx_nc, idx_t):
        assert torch.equal(pm.ops.run_crop(backend, [hid, src], i, 2, 3, (60, 80)),
                           pm.ops.run_crop(backend, [hid, src], idx, 2, 3, (60, 80)))
        assert torch.equal(pm.ops.run_replace(backend, x, patches, i, valid_nc),
                           pm.ops.run_replace(backend, x, patches, idx, valid))
        assert torch.equal(pm.ops.run_compose(backend, coarse, patches, i, valid_nc, (120, 160), src),
                           pm.ops.run_compose(backend, coarse, patches, idx, valid, (120, 160), src))


# -- no host synchronisation, CUDA graphs, determinism ---------------------------

def hd_model_and_inputs(backend, dtype=torch.float32, prevent=True):
    H, W, scale, pixels = HD
    model = random_bn_(refiner("sampling", pixels, 0.1, 3, prevent, backend)).cuda().to(dtype).eval()
    return model, refiner_inputs(1, H, W, int(H * scale), int(W * scale), "cuda", dtype)


@pytest.mark.parametrize("backend", REFINER_BACKENDS)
@pytest.mark.parametrize("prevent", [True, False])
def test_eval_sampling_at_hd_never_synchronises(backend, prevent):
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prevent", [True, False])
def test_refiner_in_a_cuda_graph_at_hd(backend, prevent):
    check_refiner_in_a_cuda_graph(backend, prevent, size=(1, 1080, 1920, 270, 480), sample_pixels=80_000)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_refiner_is_deterministic(backend, dtype):
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


def triton_cache_sizes():
    """(kernel side table entries or None where this torch has none,
    {kernel: compiled variants})."""
    from pymatting_ext import triton_kernels

    side = None
    try:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
        side = len(kernel_side_table.id_to_kernel) + len(kernel_side_table.constant_args)
    except (ImportError, AttributeError):
        pass
    return side, triton_kernels.compiled_variants()


def test_triton_caches_stay_flat_over_a_video():
    try:
        _backend.resolve("triton", torch.device("cuda"), torch.float32)
    except (ValueError, RuntimeError) as exc:
        pytest.skip(str(exc))
    H, W, scale, pixels = HD
    models_ = [random_bn_(pm.Refiner(mode, pixels, 0.3, 3, True, backend="triton")).cuda().eval()
               for mode in ("sampling", "thresholding")]
    frame = lambda: refiner_inputs(1, H, W, int(H * scale), int(W * scale), "cuda")
    with torch.inference_mode():
        for m in models_:
            m(*frame())
        before = triton_cache_sizes()
        for _ in range(10):
            for m in models_:
                m(*frame())
        after = triton_cache_sizes()
    assert before[1], "no compiled Triton kernel found: compiled_variants() sees nothing"
    assert before == after, f"(side table, variants) grew from {before} to {after} over 10 frames"


# -- whole models in one CUDA graph ------------------------------------------------

@pytest.mark.parametrize("backend", REFINER_BACKENDS)
def test_matting_refine_as_one_cuda_graph(backend):
    from pymatting_ext.models import MattingRefine

    fused = False if backend == "triton-unfused" else None
    model = MattingRefine("mobilenetv2", 0.25, "sampling", 80_000, backend=backend.split("-")[0]).cuda().eval()
    model.refiner.fused = fused
    make = lambda: tuple(torch.rand(1, 3, 1080, 1920, device="cuda") for _ in range(2))
    graphed = pm.cuda_graph(model, *make())
    for _ in range(2):
        x = make()
        got = [t.clone() for t in graphed(*x)]
        with torch.inference_mode():
            want = model(*x)
        for g, w in zip(got, want):
            assert g.shape == w.shape and float((g - w).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="capture another graph"):
        graphed(*(torch.rand(1, 3, 720, 1280, device="cuda") for _ in range(2)))


# -- convert_video on a GPU (streams, pinned memory, CUDA graphs) -------------------

@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda-graph"])
def test_convert_video_on_the_gpu_equals_the_model(tmp_path, cuda_graph):
    """PNG frames in, PNG outputs out (no PyAV needed): the pipeline's copy
    stream, pinned buffers and per-batch-shape graphs (5 frames in batches
    of 2: a last batch of 1 captures a second graph) give the model's own
    outputs on the same GPU, to within one 8-bit step."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    from pymatting_ext.app import synthetic
    from pymatting_ext.models import MattingRefine

    H, W, frames = 180, 322, 5  # 322: padded to 324 and cropped back
    background = synthetic._synthetic_background(W, H)
    Image.fromarray(background).save(tmp_path / "bgr.png")
    (tmp_path / "src").mkdir()
    decoded = []
    for i in range(frames):
        frame = synthetic._synthetic_frame(background, i / (frames - 1))
        Image.fromarray(frame).save(tmp_path / "src" / f"{i:03d}.png")
        decoded.append(frame)
    torch.manual_seed(0)
    model = random_bn_(MattingRefine("mobilenetv2", 0.25, "sampling", 4_000)).cuda().eval()
    result = pm.convert_video(model, str(tmp_path / "src"), str(tmp_path / "bgr.png"), str(tmp_path / "out"),
                              outputs=("pha", "fgr"), output_format="png", batch_size=2,
                              cuda_graph=cuda_graph, progress=False)
    assert result["frames"] == frames and result["device"].startswith("cuda")

    def as_input(image):
        x = torch.from_numpy(np.array(image)).cuda().permute(2, 0, 1)[None].float().div_(255)
        return F.pad(x, (0, 2, 0, 0), mode="replicate")

    bgr = as_input(background)
    for i, frame in enumerate(decoded):
        with torch.inference_mode():
            pha, fgr = model(as_input(frame), bgr)[:2]
        want = {"pha": pha[:, :, :, :W], "fgr": fgr[:, :, :, :W]}
        for name, value in want.items():
            got = torch.from_numpy(np.array(Image.open(tmp_path / "out" / name / f"{i:05d}.png"))).cuda()
            ref = value.float().mul(255).round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).squeeze(-1)
            assert got.shape == ref.shape, name
            assert int((got.int() - ref.int()).abs().max()) <= 1, (name, i)
