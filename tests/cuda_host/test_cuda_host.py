"""The CUDA kernels (kernels/cuda) run on the CPU by the host execution
harness (tests/cuda_host: build.py, runtime.cpp), against the CPU kernels
(bit for bit: the harness is built with -ffp-contract=off, so it rounds as
the CPU kernels do; on a GPU nvcc's FMAs move the last bit, see helpers'
CROSS_ATOL) and the reference: the cases of the CUDA kernels' tests
(TestCUDAKernels in tests/ops; their case builders are in tests/helpers.py)
at sizes the harness runs quickly, the whole eval Refiner against upstream, the kernel
report, and the harness's own checks on planted defects (mutations.py runs
the same defects planted in the real kernels).

Select with `pytest -m cuda_host`."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import DTYPES
from helpers import (
    CROP_INTO_CASES,
    CUDA_ATOL,
    check_outputs,
    check_tie_tolerant,
    crop_into_case,
    cuda_crop_case,
    cuda_replace_case,
    layouts,
    random_bn_,
    refiner_inputs,
    sampling_err,
)

import pymatting_ext as pm
from pymatting_ext import reference

pytestmark = [pytest.mark.cuda_host,
              pytest.mark.skipif(not pm._extension.available(), reason="the CPU kernels (the oracle) are not built")]

cpu_ops = torch.ops.pymatting_ext
ROOT = Path(__file__).resolve().parents[2]
# tests/cuda_host/build.py, by its path ("build" is also a PyPI package).
_spec = importlib.util.spec_from_file_location("pymatting_ext_cuda_host_build", Path(__file__).with_name("build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


@pytest.fixture(scope="module")
def host():
    """torch.ops.pymatting_ext_cuda_host: the CUDA kernels on CPU tensors. CPU
    allocations are tracked (the harness's bounds check) while these tests
    run."""
    ops = build.load()
    ops.track_allocations(True)
    yield ops
    ops.track_allocations(False)


def assert_same(got, want, name=""):
    """Same shape and dtype, equal bit for bit (NaN where NaN)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    assert torch.equal(got, want) or torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(
        got.nan_to_num(), want.nan_to_num()), name


def assert_near_reference(got, want, name, cancellation=False):
    """The reference rounds as PyTorch's CPU upsample does (16-bit weights in
    16 bits); the CUDA kernels keep them in float: one rounding of the
    result apart (absolute too where sums cancel)."""
    dtype = got.dtype
    if dtype in (torch.float16, torch.bfloat16):
        eps = float(torch.finfo(dtype).eps)
        bound = (2 * eps if cancellation else 0) + 2 * eps * want.double().abs()
    else:
        bound = CUDA_ATOL[dtype] * 4 + CUDA_ATOL[dtype] * want.double().abs()
    diff = (got.double() - want.double()).abs()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), name
    assert bool((diff <= bound)[~torch.isnan(diff)].all()), f"{name}: max diff {float(diff.nan_to_num().max()):.3g}"


# -- select_sampling ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((1, 1, 7, 9), 5), ((3, 1, 13, 11), 40), ((2, 1, 5, 6), 30), ((2, 1, 5, 6), 31),
                                     ((2, 1, 5, 6), 0), ((2, 1, 4, 4), 100), ((1, 1, 1, 1), 1),
                                     ((2, 1, 67, 129), 777)])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
def test_select_sampling(host, dtype, shape, k, kind):
    # (2, 1, 67, 129): several blocks per image cooperate (the harness's
    # pretend device has 2 SMs); k = 100 of 16 cells takes them all.
    err = sampling_err(shape, dtype, kind)
    for prevent in (True, False):
        got = host.select_sampling(err, k, prevent)
        for g, c, w, name in zip(got, cpu_ops.select_sampling(err, k, prevent),
                                 reference.select_sampling(err, k, prevent), ("ref", "idx", "valid")):
            assert_same(g, c, name)
            assert_same(g, w, f"{name} vs reference")


def test_select_sampling_empty_batch_and_sliced(host):
    for shape, k in [((0, 1, 5, 5), 3), ((2, 1, 0, 5), 3)]:
        err = torch.rand(shape)
        for g, w in zip(host.select_sampling(err, k, True), reference.select_sampling(err, k, True)):
            assert_same(g, w)
    err = torch.rand(3, 2, 31, 45)[:, 1:]
    for g, w in zip(host.select_sampling(err, 99, True), reference.select_sampling(err, 99, True)):
        assert_same(g, w)


def test_select_sampling_ties_signed_zeros_and_nan(host):
    # All tied: the first k cells, across the blocks of each image.
    err = torch.full((2, 1, 30, 31), 0.5)
    _, idx, valid = host.select_sampling(err, 600, True)
    assert torch.equal((idx[:, 1] * 31 + idx[:, 2]).view(2, 600), torch.arange(600).expand(2, 600))
    assert bool(valid.all())
    for e in ([0.0, -0.0, 0.0, -0.0], [-0.0, 0.0, -0.0, 0.0]):
        _, idx, _ = host.select_sampling(torch.tensor(e).view(1, 1, 1, 4), 2, False)
        assert idx[:, 2].tolist() == [0, 1]
    err = torch.rand(1, 1, 9, 10)
    err[0, 0, 2, 3] = float("nan")
    ref, idx, valid = host.select_sampling(err, 1, True)
    assert idx.tolist() == [[0, 2, 3]] and not bool(valid[0]) and float(ref.sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_select_sampling_16_bit_keys_every_bit_pattern(host, dtype):
    # Two radix passes over 16-bit keys: every bit pattern once (NaN of both
    # signs, infinities, signed zeros, subnormals), against the CPU kernel's
    # 32-bit keys; several blocks an image.
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    err = bits[torch.randperm(65536)].view(dtype).view(1, 1, 256, 256)
    for k in (1, 2048, 65535):
        for g, w, name in zip(host.select_sampling(err, k, True), cpu_ops.select_sampling(err, k, True),
                              ("ref", "idx", "valid")):
            assert_same(g, w, f"k={k} {name}")


# -- select_thresholding -----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (3, 1, 31, 17), (2, 1, 64, 100), (0, 1, 4, 4)])
@pytest.mark.parametrize("threshold", [0.0, 1.0, 0.5, -1.0])
def test_select_thresholding(host, dtype, shape, threshold):
    # (2, 1, 64, 100): 7 tiles, the scan's carry; threshold 0 and 1 are
    # reached by values exactly 0 and 1 (not above).
    err = torch.rand(shape)
    err.view(-1)[::7] = 0.0
    err.view(-1)[3::11] = 1.0
    err = err.to(dtype)
    got = host.select_thresholding(err, threshold)
    for g, c, w, name in zip(got, cpu_ops.select_thresholding(err, threshold),
                             reference.select_thresholding(err, threshold), ("ref", "idx")):
        assert_same(g, c, name)
        assert_same(g, w, f"{name} vs reference")


def test_select_thresholding_sliced_input(host):
    err = torch.rand(2, 3, 40, 70)[:, 2:, :, ::2]
    for g, w in zip(host.select_thresholding(err, 0.3), reference.select_thresholding(err, 0.3)):
        assert_same(g, w)


# -- crop and crop_into --------------------------------------------------------

def cpu_crop(inputs, *args):
    """The CPU kernel's crop as the CUDA kernel computes it: in 16-bit types
    the CUDA kernel blends the widened values with float weights and rounds
    once (the CPU kernel rounds its weights to 16 bits, as PyTorch's CPU
    upsample does), so its result is the float32 crop of the widened inputs,
    rounded: bit for bit."""
    dtype = inputs[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        return cpu_ops.crop([t.float() for t in inputs], *args).to(dtype)
    return cpu_ops.crop(inputs, *args)


@pytest.fixture(autouse=True)
def _cpu_cuda(monkeypatch):
    # helpers' CUDA case builders call .cuda(): the harness takes CPU tensors.
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("B,stride,padding,patch", [(1, 2, 3, None), (3, 2, 0, None), (1, 4, 2, None),
                                                    (3, 2, 1, (5, 9)), (1, 3, 4, (7, 2))])
def test_crop(host, dtype, layout, B, stride, padding, patch):
    inputs, idx, size = cuda_crop_case(B, dtype, layout, stride)
    ph, pw = patch or (stride + 2 * padding,) * 2
    got = host.crop(inputs, idx, stride, padding, list(size), [ph, pw])
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert_same(got, cpu_crop(inputs, idx, stride, padding, list(size), [ph, pw]), "crop vs cpu kernel")
    assert_near_reference(got, reference.crop(inputs, idx, stride, padding, size, (ph, pw)), "crop")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_crop_many_and_wide_inputs(host, dtype):
    # 12 inputs (more than one launch's 8 segments, one with no channels) and
    # a 200-channel input (more than one launch's 384 bytes a pixel).
    B, H, W = 2, 20, 28
    many = [torch.rand(B, 1 + i % 3, 10 if i % 2 else H, 14 if i % 2 else W).to(dtype) for i in range(11)]
    many.insert(4, torch.rand(B, 0, H, W).to(dtype))
    wide = torch.rand(B, 200, H // 2, W // 2).to(dtype)
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, H // 2, W // 2), 7, False)
    for inputs in (many, [wide, many[0]], [layouts(wide, "channels_last")]):
        got = host.crop(inputs, idx, 2, 3, [H, W], [8, 8])
        assert_same(got, cpu_crop(inputs, idx, 2, 3, [H, W], [8, 8]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_crop_whole_image(host, dtype):
    # The full mode's crop: one patch an image, larger than a block's tile.
    B, H, W = 2, 36, 44
    hid, pha = torch.rand(B, 5, H // 4, W // 4).to(dtype), torch.rand(B, 1, H // 4, W // 4).to(dtype)
    whole = torch.tensor([[0, 0, 0], [1, 0, 0]])
    size = (H // 2 + 6, W // 2 + 6)
    got = host.crop([hid, pha], whole, 1, 3, [H // 2, W // 2], list(size))
    assert_same(got, cpu_crop([hid, pha], whole, 1, 3, [H // 2, W // 2], list(size)))


def nan_channels_last(P, C, ph, pw, dtype, offset=0):
    flat = torch.full((offset + P * C * ph * pw,), float("nan"), dtype=dtype)
    return flat.as_strided((P, C, ph, pw), (C * ph * pw, 1, pw * C, C), offset)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CROP_INTO_CASES)
def test_crop_into(host, dtype, case):
    # Storage offsets of one element break the 16-byte alignment of out: the
    # kernel must take narrower stores (a misaligned one is an error here).
    B, H, W = 2, 24, 32
    src, bgr = torch.rand(B, 3, H, W).to(dtype), torch.rand(B, 3, H, W).to(dtype)
    coarse = torch.rand(B, 4, H // 4, W // 4).to(dtype)
    _, idx, _ = reference.select_sampling(torch.rand(B, 1, H // 4, W // 4), 9, False)
    idx = torch.cat([idx, torch.tensor([[0, 0, 0], [B - 1, H // 4 - 1, W // 4 - 1]])])
    inputs, c_out, offset, storage_offset = crop_into_case(case, src, bgr, coarse)
    C = sum(t.shape[1] for t in inputs)
    out = nan_channels_last(idx.shape[0], c_out, 8, 8, dtype, storage_offset)
    want = nan_channels_last(idx.shape[0], c_out, 8, 8, dtype, storage_offset)
    host.crop_into(inputs, idx, 4, 2, [H, W], offset, out)
    want[:, offset:offset + C] = cpu_crop(inputs, idx, 4, 2, [H, W], [8, 8])
    assert_same(out, want, case)
    assert bool(out[:, :offset].isnan().all()) and bool(out[:, offset + C:].isnan().all())


# -- replace -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,P,s", [(1, 4, 8, 12, 5, 4), (3, 2, 20, 16, 40, 4), (2, 3, 9, 6, 7, 3),
                                         (2, 4, 8, 8, 0, 4), (1, 1, 6, 10, 9, 2), (1, 2, 5, 7, 20, 1),
                                         (0, 2, 8, 8, 0, 4)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_replace(host, dtype, B, C, H, W, P, s, layout):
    x, patches, idx, valid = cuda_replace_case(max(B, 1), C, H, W, P, s, dtype)
    x = layouts(x[:B], layout)
    patches = layouts(patches, layout)
    for v in (valid, None):
        got = host.replace(x, patches, idx, v)
        assert_same(got, cpu_ops.replace(x, patches, idx, v))
        assert got.stride() == x.clone().stride()


# -- compose and compose_into ------------------------------------------------

def cpu_compose(coarse, patches, idx, valid, size, src):
    """The CPU kernel's compose as the CUDA kernel computes it: in 16-bit
    types the upsample of the widened coarse map with float weights, rounded
    once; then the epilogue on the rounded values, as the CUDA kernel does
    (clamp alpha; foreground + src rounded, then clamped)."""
    dtype = coarse.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return cpu_ops.compose(coarse, patches, idx, valid, size, src)
    out = cpu_ops.compose(coarse.float(), patches.float(), idx, valid, size, None).to(dtype)
    if src is not None:
        out[:, :1] = out[:, :1].clamp(0, 1)
        out[:, 1:] = (out[:, 1:].float() + src.float()).to(dtype).clamp(0, 1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hc,Wc,H,W,s,P", [(1, 5, 7, 20, 28, 4, 9), (3, 11, 6, 44, 24, 4, 50),
                                              (2, 9, 13, 20, 28, 4, 0), (2, 7, 9, 27, 15, 3, 12),
                                              (1, 5, 5, 10, 18, 2, 20), (1, 4, 6, 7, 9, 1, 30),
                                              (0, 4, 6, 8, 12, 4, 0)])
@pytest.mark.parametrize("epilogue", [False, True])
def test_compose(host, dtype, B, Hc, Wc, H, W, s, P, epilogue):
    coarse = (torch.rand(B, 4, Hc, Wc) * 1.4 - 0.2).to(dtype)
    _, patches, idx, valid = cuda_replace_case(max(B, 1), 4, H, W, P, s, dtype)
    patches = patches * 1.4 - 0.2
    src = torch.rand(B, 3, H, W).to(dtype) if epilogue else None
    for v in (valid, None):
        got = host.compose(coarse, patches, idx, v, [H, W], src)
        assert_same(got, cpu_compose(coarse, patches, idx, v, [H, W], src))
        assert_near_reference(got, reference.compose(coarse, patches, idx, v, (H, W), src), "compose",
                              cancellation=True)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compose_strided_inputs(host, layout, dtype):
    coarse = layouts(torch.rand(2, 4, 10, 11).to(dtype), layout)
    _, patches, idx, valid = cuda_replace_case(2, 4, 40, 44, 20, 4, dtype)
    patches = layouts(patches, layout)
    src = layouts(torch.rand(2, 3, 40, 44).to(dtype), layout)
    assert_same(host.compose(coarse, patches, idx, valid, [40, 44], src),
                cpu_compose(coarse, patches, idx, valid, [40, 44], src))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage_offset", [0, 1, 2])
@pytest.mark.parametrize("s", [4, 3])
def test_compose_into(host, dtype, storage_offset, s):
    # out starting 1 or 2 elements into its storage: no vector stores then.
    B, H, W = 2, 6 * s, 5 * s
    coarse = torch.rand(B, 4, 7, 9).to(dtype)
    _, patches, idx, valid = cuda_replace_case(B, 4, H, W, 12, s, dtype)
    src = torch.rand(B, 3, H, W).to(dtype)
    flat = torch.full((storage_offset + B * 4 * H * W,), float("nan"), dtype=dtype)
    out = flat[storage_offset:].view(B, 4, H, W)
    host.compose_into(coarse, patches, idx, valid, src, out)
    assert_same(out, cpu_compose(coarse, patches, idx, valid, [H, W], src))
    assert bool(flat[:storage_offset].isnan().all())


def test_out_of_range_idx_is_a_device_assertion(host):
    bad = torch.tensor([[0, 0, 0], [0, 99, 0]])
    x, p = torch.rand(1, 2, 8, 8), torch.rand(2, 2, 4, 4)
    calls = [lambda: host.crop([x], bad, 4, 0, [8, 8], [4, 4]),
             lambda: host.replace(x, p, bad, None),
             lambda: host.compose(x, p, bad, None, [8, 8], None)]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"device-side assertion failed: pymatting_ext: an idx row .* block"):
            call()


# -- the Refiner against upstream ----------------------------------------------

@pytest.fixture
def refiner_on_host(host, monkeypatch):
    """Refiner(backend='cpu') with the compiled ops taken from the harness:
    the CUDA kernels and their host wrappers on CPU tensors."""
    real = pm.ops._compiled
    monkeypatch.setattr(pm.ops, "_compiled", lambda backend: host if backend == "cpu" else real(backend))


@pytest.mark.parametrize("mode", ["sampling", "thresholding", "full"])
@pytest.mark.parametrize("kernel_size", [3, 1])
def test_refiner_eval_matches_upstream(refiner_on_host, tmp_path, monkeypatch, mode, kernel_size):
    Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("PYMATTING_EXT_CUDA_HOST_REPORT", str(report))
    B, H, W, Hc, Wc = 2, 64, 96, 16, 24
    up = random_bn_(Upstream(mode, 1600, 0.4, kernel_size, False))
    ours = pm.Refiner(mode, 1600, 0.4, kernel_size, False, backend="cpu")
    ours.load_state_dict(up.state_dict())
    x = refiner_inputs(B, H, W, Hc, Wc)
    with torch.no_grad():
        want, got = up.eval()(*x), ours.eval()(*x)
    if mode == "sampling":
        check_tie_tolerant(want, got, x[4], 1600 // 16, 1e-5)
    else:
        check_outputs(want, got)
    # The harness ran the refiner's kernels (full mode: crops only).
    want = {"full": {"crop_kernel"},
            "sampling": {"radix_histogram_kernel", "radix_count_kernel", "radix_write_kernel"},
            "thresholding": {"threshold_flag_kernel", "exclusive_scan_kernel", "threshold_write_kernel"}}[mode]
    if mode != "full":
        want |= {"crop_kernel", "cell_map_kernel", "compose_kernel"}
    assert set(report.read_text().split()) == want


# -- the kernel report ---------------------------------------------------------

def global_kernels():
    """Every __global__ kernel defined under kernels/ (its name)."""
    names = set()
    for f in (ROOT / "kernels").rglob("*.cu*"):
        text = f.read_text()
        for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(", text):
            names.add(m.group(1))
    return names


def launch_bounds():
    """{kernel: its __launch_bounds__ (1024 without one)}, from the sources
    (the bound's expression evaluated over the file's integer constants)."""
    bounds = {name: 1024 for name in global_kernels()}
    for f in (ROOT / "kernels").rglob("*.cu*"):
        text = f.read_text()
        consts = {m.group(1): m.group(2) for m in re.finditer(r"constexpr\s+\w+\s+(k\w+)\s*=\s*([\w\s*+]+);", text)}
        for m in re.finditer(r"__global__\s+void\s+__launch_bounds__\s*\(([^)]*)\)\s*(\w+)\s*\(", text):
            expr = m.group(1)
            for _ in range(3):
                expr = re.sub(r"\bk\w+\b", lambda c, consts=consts: f"({consts[c.group(0)]})", expr)
            bounds[m.group(2)] = int(eval(expr, {"__builtins__": {}}))
    return bounds


def run_every_kernel(host):
    err = torch.rand(2, 1, 9, 10)
    _, idx, valid = host.select_sampling(err, 20, True)
    host.select_thresholding(err, 0.5)
    x = torch.rand(2, 4, 36, 40)
    patches = host.crop([x], idx, 4, 0, [36, 40], [4, 4])
    host.crop([x[:, :1]], idx, 4, 2, [36, 40], [8, 8])
    host.replace(x, patches, idx, valid)
    host.compose(torch.rand(2, 4, 9, 10), patches, idx, valid, [36, 40], None)


def test_kernel_report_lists_every_global_kernel(host, tmp_path, monkeypatch):
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("PYMATTING_EXT_CUDA_HOST_REPORT", str(report))
    run_every_kernel(host)
    want = global_kernels()
    assert len(want) == 10, want
    assert set(report.read_text().split()) == want


def test_blocks_within_launch_bounds(host, tmp_path, monkeypatch):
    log = tmp_path / "launches.txt"
    monkeypatch.setenv("PYMATTING_EXT_CUDA_HOST_LAUNCHES", str(log))
    run_every_kernel(host)
    bounds = launch_bounds()
    assert bounds["crop_kernel"] == 256 and bounds["compose_kernel"] == 256 and bounds["cell_map_kernel"] == 1024
    launches = [line.split() for line in log.read_text().splitlines()]
    assert {name for name, _ in launches} == set(bounds)
    for name, threads in launches:
        assert int(threads) <= bounds[name], (name, threads, bounds[name])


# -- the harness's checks, on planted defects ----------------------------------

CHECKS = {
    # host_checks.cpp's case: the error it must raise (None: runs clean).
    "divergent_barrier": r"barrier divergence: thread 0 .* waits at __syncthreads, which thread 3 never reaches: "
                         r"it has exited \(in divergent_barrier, block \(0, 0, 0\)",
    "mask_without_caller": r"__match_any_sync: the mask 0xfffffffe leaves out the calling lane 0 "
                           r"\(in mask_without_caller, block \(0, 0, 0\), thread \(0, 0, 0\)\)",
    "mask_names_exited_lane": r"__match_any_sync: the mask 0xffffffff names lane 5, which has exited .*thread \(6, 0, 0\)",
    "warp_ordered": None,
    "across_warps": r"shared memory race: a read after a write of static shared byte \d+ by this thread and thread 31 "
                    r".*thread \(63, 0, 0\)",
    "write_after_read": r"shared memory race: a write after a read .* block \(0, 0, 0\), thread \(1, 0, 0\)",
    "temp_storage_reuse": r"shared memory race: a write after a read .*temp_storage_reuse<false>",
    "temp_storage_barrier": None,
    "uninitialized_shared": r"read of uninitialized static shared byte \d+: no thread of this block has written it",
    "global_off_by_one": r"out-of-bounds global write of 4 bytes at byte 512 of an allocation of 512 bytes",
    "dynamic_shared_off_by_one": r"out-of-bounds dynamic shared memory write of 4 bytes at byte 256 of the launch's 256 "
                                 r".*thread \(63, 0, 0\)",
    "misaligned_vector_store": r"misaligned access: 'struct uint4' at 0x[0-9a-f]+ needs 16-byte alignment",
    "block_too_large": r"invalid launch: block \(1025, 1, 1\)",
    "grid_y_too_large": r"invalid launch: grid \(1, 65536, 1\)",
    "shared_too_large": r"invalid launch: 49156 bytes of dynamic shared memory",
}


@pytest.mark.parametrize("case", list(CHECKS))
def test_each_check_catches_its_planted_defect(host, case):
    buf = torch.zeros(128)
    if CHECKS[case] is None:
        host.check_case(case, buf)
    else:
        with pytest.raises(RuntimeError, match="pymatting_ext CUDA host harness: .*" + CHECKS[case]):
            host.check_case(case, buf)
    # A failed launch leaves the harness usable.
    err = torch.rand(1, 1, 5, 7)
    for g, w in zip(host.select_thresholding(err, 0.5), cpu_ops.select_thresholding(err, 0.5)):
        assert_same(g, w)
