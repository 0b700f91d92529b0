"""select_sampling and select_thresholding on every backend: the CPU, CUDA
and Triton kernels (Triton through its interpreter without a GPU) against the
reference (itself checked against torch.topk) over dtypes, odd shapes, k = 0
and k beyond the grid, ties, NaN and signed zeros; every GPU backend at the
refiner's size on special values and on two streams at once; Triton's
launches (several chunks an image, keys of every bit pattern, the launch plan
for any batch size, the batch in slices); and the CUDA kernels beyond that
(TestCUDAKernels: more shapes, the refiner's sizes bit for bit against the
CPU kernel, 16-bit keys of every bit pattern, batches past the grid's limit,
determinism, no host synchronisation).

(Properties on generated inputs: test_properties.py; bad arguments:
test_bad_input.py; opcheck: test_opcheck.py.)"""
import importlib

import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import BACKEND_CASES, CPU_BACKENDS, CUDA_KERNELS, DTYPES, GPU_CASES, TRITON_CASES, skip_unsupported
from helpers import assert_equal, sampling_err

ops = torch.ops.pymatting_ext

try:
    import triton  # noqa: F401
except ImportError:
    common = select = None
else:
    # NB: imported after conftest, which chooses the interpreter where there
    # is no GPU (the package's __init__ exports functions named like its
    # modules).
    common = importlib.import_module("pymatting_ext.triton_kernels.common")
    select = importlib.import_module("pymatting_ext.triton_kernels.select")
needs_triton = pytest.mark.skipif(select is None, reason="needs Triton")


# -- select_sampling ---------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,k", [((1, 1, 7, 9), 5), ((3, 1, 13, 11), 40), ((2, 1, 5, 6), 30),
                                     ((2, 1, 5, 6), 0), ((2, 1, 4, 4), 100)])
@pytest.mark.parametrize("prevent", [True, False])
def test_select_sampling_matches_reference(device, backend, dtype, shape, k, prevent):
    skip_unsupported(backend, dtype)
    err = (torch.rand(shape) - 0.2).to(dtype).to(device)
    got = pm.select_sampling(err, k, prevent, backend=backend)
    want = reference.select_sampling(err.cpu(), k, prevent)
    for g, w, name in zip(got, want, ("ref", "idx", "valid")):
        assert g.device.type == device
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.cpu(), w), name
    ref, idx, valid = got
    n = min(k, shape[2] * shape[3])
    assert ref.dtype == dtype and idx.dtype == torch.int64 and valid.dtype == torch.bool
    assert idx.shape == (shape[0] * n, 3)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_sampling_ties_nan_and_signed_zero(device, backend, dtype):
    skip_unsupported(backend, dtype)
    # Few distinct values: most of the choice is tie-breaking.
    err = torch.randint(0, 4, (3, 1, 9, 10)).to(dtype) / 4
    err[0, 0, 2, 3] = float("nan")
    err[1, 0, 0, :] = -0.0
    err[1, 0, 1, :] = 0.0
    err[2] = 0.5
    err = err.to(device)
    for k in (1, 17, 45, 89, 90):
        got = pm.select_sampling(err, k, True, backend=backend)
        want = reference.select_sampling(err.cpu(), k, True)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w)
    # Image 2 is all ties: the first k cells in row-major order.
    _, idx, _ = pm.select_sampling(err, 7, False, backend=backend)
    rows = idx.cpu()[idx.cpu()[:, 0] == 2]
    assert rows[:, 1:].tolist() == [[0, x] for x in range(7)]
    # NaN counts as the largest (picked first) but is not valid (not > 0).
    ref, idx, valid = pm.select_sampling(err, 1, True, backend=backend)
    assert idx.cpu()[0].tolist() == [0, 2, 3] and not bool(valid.cpu()[0]) and ref.cpu()[0].sum() == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_select_sampling_signed_zero_ties(backend):
    # -0.0 == +0.0, so they tie and the lower index wins, whatever the sign.
    err = torch.tensor([[[[0.0, -0.0, 0.0, -0.0]]]])
    err2 = torch.tensor([[[[-0.0, 0.0, -0.0, 0.0]]]])
    for e in (err, err2):
        _, idx, _ = pm.select_sampling(e, 2, False, backend=backend)
        assert idx[:, 2].tolist() == [0, 1]


def test_reference_select_matches_topk_without_ties():
    err = torch.rand(4, 1, 17, 23)
    k = 50
    ref, idx, valid = reference.select_sampling(err, k, True)
    top = err.view(4, -1).topk(k, dim=1).indices.sort(dim=1).values
    flat = idx[:, 1] * 23 + idx[:, 2]
    assert torch.equal(flat.view(4, k), top)
    assert torch.equal(idx[:, 0], torch.arange(4).repeat_interleave(k))
    expect = torch.zeros(4, 17 * 23).scatter_(1, top, 1.0).view(4, 1, 17, 23)
    assert torch.equal(ref, expect) and bool(valid.all())


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


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_select_sampling_keys_of_every_kind(device, backend, dtype):
    # Every class of bit pattern: NaNs of both signs and several payloads
    # (all largest, tied), infinities, -0 == +0, subnormals, and many ties
    # across chunks; two radix passes decide 16-bit keys as four do float32.
    info = torch.finfo(dtype)
    ibits = torch.int32 if dtype == torch.float32 else torch.int16
    err = (torch.randint(-3, 4, (2, 1, 300, 301)) / 4).to(dtype)
    flat = err.view(2, -1)
    bits = flat.view(ibits)
    exponent = {torch.float32: 0x7F800000, torch.float16: 0x7C00, torch.bfloat16: 0x7F80}[dtype]
    bits[0, 5] = torch.iinfo(ibits).max  # NaN, largest payload
    bits[0, 70_000] = -1                 # negative NaN, all bits set
    bits[1, 17] = exponent + 1           # NaN, smallest payload
    flat[0, 9] = float("inf")
    flat[1, 3] = float("-inf")
    flat[0, 100:200] = -0.0
    flat[0, 200:300] = 0.0
    flat[1, 400] = info.tiny / 4         # subnormals: valid (> 0) or not
    flat[1, 401] = -info.tiny / 4
    err = err.to(device)
    for k in (1, 3, 45_000, 60_000, 90_300):
        got = pm.select_sampling(err, k, True, backend="triton")
        want = reference.select_sampling(err.cpu(), k, True)
        for name, g, w in zip(("ref", "idx", "valid"), got, want):
            assert torch.equal(g.cpu(), w), (k, name)


# -- select_sampling on every GPU backend at the refiner's size -----------------

@pytest.mark.parametrize("device,backend", GPU_CASES)
@pytest.mark.parametrize("fill", ["nan", "-inf", "zero", "one_value"])
@pytest.mark.parametrize("k_from_end", [0, 1, 5000])
@pytest.mark.parametrize("prevent", [True, False])
def test_select_sampling_edge_cases_at_refiner_size(device, backend, fill, k_from_end, prevent):
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


@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_two_selects_on_two_streams_at_once(device, backend):
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


# -- select_sampling's Triton launches for any batch size ----------------------

#: CUDA's grid limits: axis 0, and axes 1 and 2.
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_YZ = 65535


def _scratch_bytes(images, groups):
    return images * 4 * 256 * 8 + images * groups * 2 * 4


@needs_triton
def test_select_sampling_launch_plan_fits_any_batch():
    bound = _scratch_bytes(select._SLICE_IMAGES, select._MAX_GROUPS)
    assert select._SLICE_IMAGES <= MAX_GRID_YZ
    for block in (1024, 8192):
        for N in (1, 6, 8191, 8193, 129_600, 518_400, 2 ** 24):
            for B in (1, 2, 7, 1024, 4096, 4097, 65_535, 65_536, 1_000_003, 2 ** 31 - 1):
                images, chunk, groups = select.launch_plan(B, N, block)
                where = (B, N, block)
                assert 1 <= images <= min(B, MAX_GRID_YZ), where
                assert 1 <= groups <= min(select._MAX_GROUPS, MAX_GRID_X), where
                assert chunk % block == 0 and (groups - 1) * chunk < N <= groups * chunk, where
                # Scratch for one slice, whatever the batch.
                assert _scratch_bytes(images, groups) <= bound, where
    # A single image still spreads over many programs; a full slice, one each.
    assert select.launch_plan(1, 129_600, 1024)[2] == 127
    assert select.launch_plan(65_536, 129_600, 1024)[2] == 1


class _Recorder:
    """Stands in for common.wrap_triton: records each launch (kernel name,
    grid, arguments, options) without running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
                                              tuple(grid), args, kwargs))
                return launch
        return Grid()


@needs_triton
@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_select_sampling_launches_for_a_batch_past_the_grid_limit(device, backend, monkeypatch):
    # 100,000 images of 2 x 3 cells: the launches are recorded, not run.
    recorder = _Recorder()
    monkeypatch.setattr(select, "wrap_triton", recorder)
    B = 100_000
    err = torch.rand(B, 1, 2, 3, device=device)
    select.select_sampling(err, 4, True)
    images = select._SLICE_IMAGES
    slices = -(-B // images)
    per_slice = 4 + 1 + 1  # histogram passes (float32 keys), count, write
    assert len(recorder.launches) == slices * per_slice
    covered = []
    for name, grid, args, kwargs in recorder.launches:
        assert len(grid) == 2 and 1 <= grid[0] <= MAX_GRID_X and 1 <= grid[1] <= MAX_GRID_YZ, (name, grid)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        first = next(a for a in args if not isinstance(a, torch.Tensor))
        hist = tensors[1]
        assert hist.shape == (images, 4, 256), name
        if name != "_radix_histogram_kernel":
            assert tensors[2].shape == (images, grid[0], 2), name
        if name == "_radix_write_kernel":
            covered.append((first, grid[1]))
    # The slices cover the batch once, in order.
    assert [f for f, _ in covered] == list(range(0, B, images))
    assert sum(n for _, n in covered) == B


def _select_case(B, H, W, dtype, device):
    err = (torch.rand(B, 1, H, W) * 4).floor() / 4  # many ties, across chunks
    err[0, 0, 1, 2] = float("nan")
    err[B - 1, 0, -1, -1] = float("-inf")
    err[B // 2, 0, :3] = 0.0
    return err.to(dtype).to(device)


@needs_triton
@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_sampling_in_several_slices_matches_reference(device, backend, dtype, monkeypatch):
    # Slices of 3 images over a batch of 8 (the last slice partial), each
    # image over several chunks (two interpreter blocks, twelve GPU
    # programs): the scratch is reused from slice to slice.
    monkeypatch.setattr(select, "_SLICE_IMAGES", 3)
    real = select.wrap_triton
    grids = []

    def counting(kernel):
        launcher = real(kernel)

        class Grid:
            def __getitem__(self, grid):
                grids.append(tuple(grid))
                return launcher[grid]
        return Grid()

    monkeypatch.setattr(select, "wrap_triton", counting)
    err = _select_case(8, 100, 120, dtype, device)
    for k, prevent in ((1, True), (700, False), (9000, True), (12_000, True)):
        grids.clear()
        got = pm.select_sampling(err, k, prevent, backend="triton")
        want = reference.select_sampling(err.cpu(), k, prevent)
        for name, g, w in zip(("ref", "idx", "valid"), got, want):
            assert torch.equal(g.cpu(), w), (k, prevent, name)
        assert sorted({g[1] for g in grids}) == [2, 3], grids  # slices 3, 3, 2
        chunks = select.launch_plan(3, 100 * 120, common.block_size(1024, 8192))[2]
        assert chunks > 1 and {g[0] for g in grids} == {chunks}, grids


# -- select_thresholding -----------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (3, 1, 31, 17), (2, 1, 64, 300)])
@pytest.mark.parametrize("threshold", [0.1, 0.5, 2.0, -1.0])
def test_select_thresholding_matches_reference(device, backend, dtype, shape, threshold):
    skip_unsupported(backend, dtype)
    err = torch.rand(shape).to(dtype).to(device)
    ref, idx = pm.select_thresholding(err, threshold, backend=backend)
    want_ref, want_idx = reference.select_thresholding(err.cpu(), threshold)
    assert ref.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(ref.cpu(), want_ref) and torch.equal(idx.cpu(), want_idx)
    assert torch.equal(want_idx, torch.nonzero(err.cpu()[:, 0] > threshold))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_thresholding_rounds_threshold_to_dtype(backend, dtype):
    skip_unsupported(backend, dtype)
    # As torch.gt: 0.1 is first rounded to err's dtype, so err == round(0.1)
    # is not selected.
    err = torch.full((1, 1, 2, 2), 0.1, dtype=dtype)
    ref, idx = pm.select_thresholding(err, 0.1, backend=backend)
    assert ref.sum() == 0 and idx.shape == (0, 3)
    assert ref.sum() == err.gt(0.1).sum()


@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_select_thresholding_edge_cases(device, backend):
    for value in (float("nan"), float("-inf"), 0.0, float("inf")):
        err = torch.full((2, 1, 270, 480), value)
        got = pm.ops.run_select_thresholding(backend, err.cuda(), 0.1)
        want = pm.ops.run_select_thresholding("cpu", err, 0.1)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), value


# -- the CUDA kernels -----------------------------------------------------------

class TestCUDAKernels:
    """The CUDA kernels (kernels/cuda) through torch.ops.pymatting_ext on CUDA
    tensors, against the reference and the CPU kernels on the same data."""

    pytestmark = CUDA_KERNELS

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape,k", [((1, 1, 7, 9), 5), ((3, 1, 13, 11), 40), ((2, 1, 5, 6), 30),
                                         ((2, 1, 5, 6), 31), ((2, 1, 5, 6), 0), ((2, 1, 4, 4), 100), ((1, 1, 1, 1), 1),
                                         ((2, 1, 67, 129), 777), ((3, 1, 100, 251), 4000)])
    @pytest.mark.parametrize("kind", ["random", "ties", "special"])
    @pytest.mark.parametrize("prevent", [True, False])
    def test_select_sampling_matches_reference(self, dtype, shape, k, kind, prevent):
        err = sampling_err(shape, dtype, kind)
        got = ops.select_sampling(err.cuda(), k, prevent)
        want = reference.select_sampling(err, k, prevent)
        for g, w, name in zip(got, want, ("ref", "idx", "valid")):
            assert g.device.type == "cuda", name
            assert_equal(g, w, name)
        n = min(k, shape[2] * shape[3])
        assert got[1].shape == (shape[0] * n, 3)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("kind", ["random", "ties", "special"])
    def test_select_sampling_at_refiner_sizes_equals_cpu_kernel(self, dtype, kind):
        # HD (N = 129,600, k = 5,000) and 4K (N = 518,400, k = 20,000): many
        # cooperating blocks per image; the CPU kernel is the oracle, bit for bit.
        for shape, k in [((1, 1, 270, 480), 5000), ((2, 1, 270, 480), 5000), ((2, 1, 540, 960), 20000)]:
            err = sampling_err(shape, dtype, kind)
            for prevent in (True, False):
                got = ops.select_sampling(err.cuda(), k, prevent)
                want = ops.select_sampling(err, k, prevent)
                for g, w, name in zip(got, want, ("ref", "idx", "valid")):
                    assert_equal(g, w, f"{shape} {name}")

    def test_select_sampling_all_ties_takes_the_first_cells(self):
        err = torch.full((2, 1, 300, 301), 0.5, device="cuda")
        _, idx, valid = ops.select_sampling(err, 1000, True)
        flat = (idx[:, 1] * 301 + idx[:, 2]).view(2, 1000).cpu()
        assert torch.equal(flat, torch.arange(1000).expand(2, 1000))
        assert bool(valid.all())

    def test_select_sampling_signed_zero_ties_and_nan(self):
        for e in ([0.0, -0.0, 0.0, -0.0], [-0.0, 0.0, -0.0, 0.0]):
            err = torch.tensor(e, device="cuda").view(1, 1, 1, 4)
            _, idx, _ = ops.select_sampling(err, 2, False)
            assert idx[:, 2].tolist() == [0, 1]
        err = torch.rand(1, 1, 9, 10, device="cuda")
        err[0, 0, 2, 3] = float("nan")
        ref, idx, valid = ops.select_sampling(err, 1, True)
        assert idx.tolist() == [[0, 2, 3]] and not bool(valid[0]) and float(ref.sum()) == 0

    def test_select_sampling_empty_and_sliced(self):
        for shape, k in [((0, 1, 5, 5), 3), ((2, 1, 0, 5), 3), ((2, 1, 5, 5), 0)]:
            err = torch.rand(shape, device="cuda")
            ref, idx, valid = ops.select_sampling(err, k, True)
            want = reference.select_sampling(err.cpu(), k, True)
            for g, w in zip((ref, idx, valid), want):
                assert_equal(g, w)
        # A non-contiguous err (a channel of a larger tensor).
        big = torch.rand(3, 2, 31, 45, device="cuda")
        err = big[:, 1:]
        for g, w in zip(ops.select_sampling(err, 99, True), reference.select_sampling(err.cpu(), 99, True)):
            assert_equal(g, w)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("k", [1, 77, 2048, 30000, 65535, 65536])
    def test_select_sampling_16_bit_keys_order_every_bit_pattern(self, dtype, k):
        # float16/bfloat16 are keyed on their 16 bits (two radix passes): every
        # bit pattern once (NaNs of both signs, infinities, signed zeros,
        # subnormals), shuffled, must select exactly what the CPU kernel's 32-bit
        # keys of the widened values select, ties and all.
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        err = bits[torch.randperm(65536)].view(dtype).view(1, 1, 256, 256)
        err = torch.cat([err, err.flip(3)])  # a second image, other positions
        for prevent in (True, False):
            got = ops.select_sampling(err.cuda(), k, prevent)
            want = ops.select_sampling(err, k, prevent)
            for g, w, name in zip(got, want, ("ref", "idx", "valid")):
                assert_equal(g, w, name)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_select_sampling_writes_all_of_ref(self, dtype):
        # ref is not zeroed before the kernels run: leave NaN where it will be
        # allocated, and every cell, selected or not, must still come out 0/1.
        for shape, k in [((2, 1, 270, 480), 5000), ((3, 1, 7, 9), 5), ((2, 1, 5, 6), 0)]:
            junk = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
            del junk
            err = sampling_err(shape, dtype, "random")
            got = ops.select_sampling(err.cuda(), k, True)
            want = ops.select_sampling(err, k, True)
            for g, w, name in zip(got, want, ("ref", "idx", "valid")):
                assert_equal(g, w, f"{shape} {name}")

    def test_select_sampling_batch_beyond_grid_y_limit(self):
        # More images than a grid's y dimension holds (65535), and than one slice
        # of the scratch: launched in slices that reuse it.
        err = sampling_err((70000, 1, 2, 3), torch.float32, "ties")
        got = ops.select_sampling(err.cuda(), 2, True)
        want = ops.select_sampling(err, 2, True)
        for g, w in zip(got, want):
            assert_equal(g, w)

    def test_select_sampling_is_deterministic(self):
        err = sampling_err((2, 1, 270, 480), torch.float32, "ties").cuda()
        first = ops.select_sampling(err, 5000, True)
        for _ in range(3):
            for a, b in zip(first, ops.select_sampling(err, 5000, True)):
                assert torch.equal(a, b)

    def test_select_sampling_never_synchronises(self):
        err = torch.rand(2, 1, 270, 480, device="cuda")
        ops.select_sampling(err, 5000, True)  # warm up (allocator, module load)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.select_sampling(err, 5000, True)
            ops.select_sampling(err.double(), 5000, False)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(1, 1, 7, 9), (3, 1, 31, 17), (2, 1, 64, 300), (3, 1, 270, 480), (0, 1, 4, 4)])
    @pytest.mark.parametrize("threshold", [0.1, 0.5, 0.999, 2.0, -1.0])
    def test_select_thresholding_matches_reference(self, dtype, shape, threshold):
        err = torch.rand(shape).to(dtype)
        ref, idx = ops.select_thresholding(err.cuda(), threshold)
        want_ref, want_idx = reference.select_thresholding(err, threshold)
        assert_equal(ref, want_ref, "ref")
        assert_equal(idx, want_idx, "idx")
        cpu_ref, cpu_idx = ops.select_thresholding(err, threshold)
        assert_equal(ref, cpu_ref, "ref vs cpu kernel")
        assert_equal(idx, cpu_idx, "idx vs cpu kernel")

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_select_thresholding_rounds_threshold_to_dtype_and_keeps_nan_out(self, dtype):
        err = torch.full((1, 1, 2, 2), 0.1, dtype=dtype, device="cuda")
        err[0, 0, 0, 0] = float("nan")
        ref, idx = ops.select_thresholding(err, 0.1)
        assert float(ref.sum()) == float(err.gt(0.1).sum()) == 0 and idx.shape == (0, 3)

    def test_select_thresholding_sliced_input(self):
        big = torch.rand(2, 3, 40, 70, device="cuda")
        err = big[:, 2:, :, ::2]
        for g, w in zip(ops.select_thresholding(err, 0.3), reference.select_thresholding(err.cpu(), 0.3)):
            assert_equal(g, w)
