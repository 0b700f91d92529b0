"""replace, compose and compose_into on every backend: the CPU, CUDA and
Triton kernels (Triton through its interpreter without a GPU) against the
reference (itself checked against a sequential loop) over dtypes, layouts,
odd sizes, duplicate cells (the last valid patch wins), valid masks, empty
selections and MattingRefine's epilogue (its rounding, NaN kept);
compose_into writing what compose returns into any out, and its checks of
out; Triton's raw ops on sizes off the cell grid; the CUDA kernels beyond
that (TestCUDAKernels: other patch sizes, strided inputs, more images or
planes than a grid holds, out anywhere in its storage); and the CPU
kernels' AVX2 paths of compose (TestCPUVector: bit for bit the portable
loops).

(The resample's scale: test_resample.py; properties: test_properties.py;
bad arguments: test_bad_input.py; gradients: test_autograd.py; past 2^31
elements: test_int64.py.)"""
import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import BACKEND_CASES, CPU_BACKENDS, CPU_VECTOR, CUDA_KERNELS, DTYPES, TRITON_CASES, skip_unsupported
from helpers import (BILINEAR_ATOL, assert_close, assert_equal, assert_matches_cpu_kernel,
                     assert_matches_cuda_reference, check_vector_paths_match_portable_loops, cpu, cuda_replace_case,
                     layouts, vector_compose_cases, vector_compose_results)

ops = torch.ops.pymatting_ext


# -- replace -----------------------------------------------------------------

def replace_case(B, C, H, W, P, s, device, dtype):
    x = torch.rand(B, C, H, W).to(dtype).to(device)
    patches = torch.rand(P, C, s, s).to(dtype).to(device)
    idx = torch.stack([torch.randint(0, B, (P,)), torch.randint(0, H // s, (P,)),
                       torch.randint(0, W // s, (P,))], 1).to(device)
    if P >= 2:
        idx[1] = idx[0]  # a duplicate cell: the later patch wins
    valid = (torch.rand(P) > 0.3).to(device)
    return x, patches, idx, valid


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,P,s", [(1, 4, 8, 12, 5, 4), (3, 2, 20, 16, 40, 4), (2, 3, 9, 6, 7, 3),
                                         (2, 4, 8, 8, 0, 4)])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_replace_matches_reference(device, backend, dtype, B, C, H, W, P, s, with_valid, layout):
    skip_unsupported(backend, dtype)
    x, patches, idx, valid = replace_case(B, C, H, W, P, s, device, dtype)
    x = layouts(x, layout)
    patches = layouts(patches, layout)
    valid = valid if with_valid else None
    got = pm.replace(x, patches, idx, valid, backend=backend)
    want = reference.replace(*cpu(x, patches, idx, valid))
    assert torch.equal(got.cpu(), want)
    assert torch.equal(x.cpu(), cpu(x)[0])  # out of place


def test_reference_replace_by_sequential_loop():
    x, patches, idx, valid = replace_case(2, 3, 12, 16, 30, 4, "cpu", torch.float32)
    want = x.clone()
    for p, (b, y, xx) in enumerate(idx.tolist()):
        if valid[p]:
            want[b, :, 4 * y:4 * y + 4, 4 * xx:4 * xx + 4] = patches[p]
    assert torch.equal(reference.replace(x, patches, idx, valid), want)


# -- compose -----------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hc,Wc,H,W,P", [(1, 5, 7, 20, 28, 9), (3, 11, 6, 44, 24, 50), (2, 9, 13, 20, 28, 0),
                                            (2, 30, 41, 120, 164, 200)])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("epilogue", [False, True])
def test_compose_matches_reference(device, backend, dtype, B, Hc, Wc, H, W, P, with_valid, epilogue):
    skip_unsupported(backend, dtype)
    coarse = (torch.rand(B, 4, Hc, Wc) * 1.4 - 0.2).to(dtype).to(device)
    _, patches, idx, valid = replace_case(B, 4, H, W, P, 4, device, dtype)
    patches = patches * 1.4 - 0.2
    src = torch.rand(B, 3, H, W).to(dtype).to(device) if epilogue else None
    valid = valid if with_valid else None
    got = pm.compose(coarse, patches, idx, valid, (H, W), src, backend=backend)
    want = reference.compose(*cpu(coarse, patches, idx, valid), (H, W), *cpu(src))
    assert got.shape == (B, 4, H, W) and got.dtype == dtype and got.is_contiguous()
    assert_close(got.cpu(), want, BILINEAR_ATOL[dtype], msg="compose")
    if epilogue:
        assert float(got.min()) >= 0 and float(got.max()) <= 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_compose_within_an_ulp_of_interpolate_with_strided_inputs(backend, layout):
    coarse = layouts(torch.rand(2, 4, 30, 41), layout)
    patches = torch.rand(0, 4, 4, 4)
    got = pm.compose(coarse, patches, torch.zeros((0, 3), dtype=torch.long), None, (120, 164), backend=backend)
    assert_close(got, F.interpolate(coarse, (120, 164), mode="bilinear", align_corners=False), 1.2e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compose_epilogue_rounds_like_matting_refine(backend):
    # MattingRefine: pha.clamp_(0, 1); fgr.add_(src).clamp_(0, 1), in the dtype.
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        coarse = (torch.randn(2, 4, 6, 7) * 2).to(dtype)
        src = torch.rand(2, 3, 24, 28).to(dtype)
        empty = torch.zeros((0, 3), dtype=torch.long)
        got = pm.compose(coarse, torch.zeros(0, 4, 4, 4, dtype=dtype), empty, None, (24, 28), src, backend=backend)
        up = F.interpolate(coarse, (24, 28), mode="bilinear", align_corners=False)
        want = torch.cat([up[:, :1].clamp(0, 1), up[:, 1:].add(src).clamp(0, 1)], 1)
        assert_close(got, want, BILINEAR_ATOL[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compose_keeps_nan(backend):
    coarse = torch.rand(1, 4, 4, 4)
    coarse[0, 0, 1, 1] = float("nan")
    src = torch.rand(1, 3, 16, 16)
    got = pm.compose(coarse, torch.zeros(0, 4, 4, 4), torch.zeros((0, 3), dtype=torch.long), None, (16, 16), src,
                     backend=backend)
    want = reference.compose(coarse, torch.zeros(0, 4, 4, 4), torch.zeros((0, 3), dtype=torch.long), None,
                             (16, 16), src)
    assert bool(torch.isnan(got).any())
    assert torch.equal(torch.isnan(got), torch.isnan(want))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_raw_compose_and_replace_refuse_sizes_off_the_cell_grid(device, backend):
    # The public ops check this first; the raw ops must not read past the
    # cell map (they segfaulted under the interpreter).
    ops = torch.ops.pymatting_ext_triton
    idx = torch.zeros((0, 3), dtype=torch.int64, device=device)
    patches = torch.zeros(0, 1, 4, 4, device=device)
    with pytest.raises(RuntimeError, match="width 13 must be divisible by the patch size 4"):
        ops.compose(torch.rand(1, 1, 3, 4, device=device), patches, idx, None, [12, 13], None)
    with pytest.raises(RuntimeError, match="height 10 must be divisible by the patch size 4"):
        ops.replace(torch.rand(1, 1, 10, 12, device=device), patches, idx, None)


# -- compose_into ------------------------------------------------------------

@pytest.mark.parametrize("device,backend", BACKEND_CASES + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hc,Wc,H,W,P", [(1, 5, 7, 20, 28, 9), (2, 30, 41, 120, 164, 200)])
@pytest.mark.parametrize("epilogue", [False, True])
def test_compose_into_writes_what_compose_returns(device, backend, dtype, B, Hc, Wc, H, W, P, epilogue):
    skip_unsupported(backend, dtype)
    coarse = (torch.rand(B, 4, Hc, Wc) * 1.4 - 0.2).to(dtype).to(device)
    _, patches, idx, valid = replace_case(B, 4, H, W, P, 4, device, dtype)
    src = torch.rand(B, 3, H, W).to(dtype).to(device) if epilogue else None
    want = pm.compose(coarse, patches, idx, valid, (H, W), src, backend=backend)
    # Every element written, also into an out that starts one element into
    # its storage (not 16-byte aligned), and again into a used one.
    for offset in (0, 1):
        out = torch.full((offset + B * 4 * H * W,), float("nan"), dtype=dtype, device=device)[offset:]
        out = out.view(B, 4, H, W)
        assert pm.compose_into(coarse, patches, idx, valid, src, out, backend=backend) is None
        assert torch.equal(out, want)
    other = pm.compose(coarse, patches.flip(0), idx, None, (H, W), src, backend=backend)
    pm.compose_into(coarse, patches.flip(0), idx, None, src, out, backend=backend)
    assert torch.equal(out, other)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_compose_into_rejects_bad_out(device, backend):
    coarse = torch.rand(2, 4, 5, 7, device=device)
    patches = torch.rand(2, 4, 4, 4, device=device)
    idx = torch.tensor([[0, 1, 1], [1, 4, 6]], device=device)

    def run(out, src=None):
        pm.compose_into(coarse, patches, idx, None, src, out, backend=backend)

    with pytest.raises(ValueError, match="compose_into: out must have shape"):
        run(torch.empty(2, 4, 20, device=device))
    with pytest.raises(ValueError, match="compose_into: out must have coarse's batch size and channels"):
        run(torch.empty(3, 4, 20, 28, device=device))
    with pytest.raises(ValueError, match="compose_into: out must have coarse's batch size and channels"):
        run(torch.empty(2, 3, 20, 28, device=device))
    with pytest.raises(ValueError, match="compose_into: out must be contiguous"):
        run(torch.empty(2, 4, 28, 20, device=device).transpose(2, 3))
    with pytest.raises(ValueError, match="compose_into: out has dtype torch.float64"):
        run(torch.empty(2, 4, 20, 28, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"compose_into: size \(22, 28\) must be divisible"):
        run(torch.empty(2, 4, 22, 28, device=device))
    # out's size sets the cell grid that idx is checked against.
    with pytest.raises((ValueError, RuntimeError), match="compose_into: idx row 1"):
        run(torch.empty(2, 4, 20, 24, device=device))
    with pytest.raises(ValueError, match="compose_into: src must have shape"):
        run(torch.empty(2, 4, 20, 28, device=device), torch.rand(2, 3, 20, 24, device=device))
    run(torch.empty(2, 4, 20, 28, device=device))  # fits


def test_compose_into_op_checks_out_itself():
    # The raw C++ op, without pymatting_ext.ops' checks.
    op = torch.ops.pymatting_ext.compose_into
    coarse, patches = torch.rand(2, 4, 5, 7), torch.rand(1, 4, 4, 4)
    idx = torch.tensor([[1, 4, 6]])
    for out, message in [(torch.empty(2, 4, 20), "compose_into: out must have shape"),
                         (torch.empty(2, 5, 20, 28), "compose_into: out must have coarse's batch size"),
                         (torch.empty(2, 4, 28, 20).transpose(2, 3), "compose_into: out must be contiguous"),
                         (torch.empty(2, 4, 20, 28, dtype=torch.float64), "compose_into: out has dtype"),
                         (torch.empty(2, 4, 20, 24), "compose_into: idx row 0")]:
        with pytest.raises(RuntimeError, match=message):
            op(coarse, patches, idx, None, None, out)


# -- the CUDA kernels -----------------------------------------------------------

class TestCUDAKernels:
    """The CUDA kernels (kernels/cuda) through torch.ops.pymatting_ext on CUDA
    tensors, against the reference and the CPU kernels on the same data."""

    pytestmark = CUDA_KERNELS

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("B,C,H,W,P,s", [(1, 4, 8, 12, 5, 4), (3, 2, 20, 16, 40, 4), (2, 3, 9, 6, 7, 3),
                                             (2, 4, 8, 8, 0, 4), (2, 4, 64, 96, 700, 4), (1, 1, 6, 10, 9, 2),
                                             (2, 3, 16, 24, 9, 8), (1, 2, 5, 7, 20, 1), (1, 5, 300, 8, 50, 4)])
    @pytest.mark.parametrize("with_valid", [False, True])
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
    def test_replace_matches_reference(self, dtype, B, C, H, W, P, s, with_valid, layout):
        x, patches, idx, valid = cuda_replace_case(B, C, H, W, P, s, dtype)
        x = layouts(x, layout)
        patches = layouts(patches, layout)
        valid = valid if with_valid else None
        before = x.clone()
        got = ops.replace(x, patches, idx, valid)
        want = reference.replace(*cpu(x, patches, idx, valid))
        assert_equal(got, want)
        assert got.stride() == x.clone().stride()  # the layout clone() gives
        assert torch.equal(x, before)  # out of place
        assert_equal(got, ops.replace(*cpu(x, patches, idx, valid)))

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_replace_more_images_than_a_grid_holds(self, layout):
        # 70,000 images: more than a grid's z dimension (65535) takes.
        x, patches, idx, valid = cuda_replace_case(70000, 2, 4, 8, 3000, 4, torch.float32)
        x = layouts(x, layout)
        got = ops.replace(x, patches, idx, valid)
        assert_equal(got, ops.replace(*cpu(x, patches, idx, valid)))

    def test_replace_last_valid_patch_wins(self):
        x = torch.zeros(1, 1, 4, 4, device="cuda")
        patches = torch.arange(1, 6, dtype=torch.float32, device="cuda").view(5, 1, 1, 1).expand(5, 1, 4, 4)
        idx = torch.zeros(5, 3, dtype=torch.long, device="cuda")
        valid = torch.tensor([True, True, True, False, False], device="cuda")
        assert float(ops.replace(x, patches, idx, valid).max()) == 3.0
        assert float(ops.replace(x, patches, idx, None).max()) == 5.0
        assert float(ops.replace(x, patches, idx, torch.zeros(5, dtype=torch.bool, device="cuda")).max()) == 0.0

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("B,Hc,Wc,H,W,s,P", [(1, 5, 7, 20, 28, 4, 9), (3, 11, 6, 44, 24, 4, 50),
                                                  (2, 9, 13, 20, 28, 4, 0),
                                                  (2, 30, 41, 120, 164, 4, 200), (2, 7, 9, 27, 15, 3, 12),
                                                  (1, 5, 5, 10, 18, 2, 20), (2, 6, 5, 24, 40, 8, 15),
                                                  (1, 4, 6, 7, 9, 1, 30), (1, 3, 4, 12, 20, 2, 25),
                                                  (1, 70, 3, 280, 12, 4, 40)])
    @pytest.mark.parametrize("with_valid", [False, True])
    @pytest.mark.parametrize("epilogue", [False, True])
    def test_compose_matches_reference(self, dtype, B, Hc, Wc, H, W, s, P, with_valid, epilogue):
        # s = 4 (the refiner's, its own kernel) and other patch sizes; widths
        # that take 4-wide vectors and widths that do not.
        coarse = (torch.rand(B, 4, Hc, Wc) * 1.4 - 0.2).to(dtype).cuda()
        _, patches, idx, valid = cuda_replace_case(B, 4, H, W, P, s, dtype)
        patches = patches * 1.4 - 0.2
        src = torch.rand(B, 3, H, W).to(dtype).cuda() if epilogue else None
        valid = valid if with_valid else None
        got = ops.compose(coarse, patches, idx, valid, [H, W], src)
        want = reference.compose(coarse, patches, idx, valid, (H, W), src)
        assert got.shape == (B, 4, H, W) and got.dtype == dtype and got.is_contiguous() and got.is_cuda
        assert_matches_cuda_reference(got, want, "compose", cancellation=True)
        assert_matches_cpu_kernel(got, ops.compose(*cpu(coarse, patches, idx, valid), [H, W], *cpu(src)),
                                  "compose vs cpu kernel")
        if epilogue:
            assert float(got.min()) >= 0 and float(got.max()) <= 1
        # Refined cells are their patches' values exactly (before the epilogue).
        if not epilogue and P > 0:
            owner = reference.cell_owner(idx, valid, B, H // s, W // s)
            b, cy, cx = torch.nonzero(owner >= 0, as_tuple=True)
            if b.numel():
                p = owner[b, cy, cx]
                cells = got.view(B, 4, H // s, s, W // s, s)[b, :, cy, :, cx, :]
                assert torch.equal(cells, patches[p])

    @pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_compose_strided_inputs(self, layout, dtype):
        coarse = layouts(torch.rand(2, 4, 30, 41, device="cuda").to(dtype), layout)
        _, patches, idx, valid = cuda_replace_case(2, 4, 120, 164, 60, 4, dtype)
        patches = layouts(patches, layout)
        src = layouts(torch.rand(2, 3, 120, 164, device="cuda").to(dtype), layout)
        got = ops.compose(coarse, patches, idx, valid, [120, 164], src)
        want = reference.compose(coarse, patches, idx, valid, (120, 164), src)
        assert_matches_cuda_reference(got, want, "compose", cancellation=True)

    def test_compose_more_planes_than_a_grid_holds(self):
        # B * C = 68,000 planes: more than a grid's z dimension (65535) takes.
        B = 17000
        coarse = torch.rand(B, 4, 1, 2, device="cuda")
        _, patches, idx, valid = cuda_replace_case(B, 4, 4, 8, 500, 4, torch.float32)
        src = torch.rand(B, 3, 4, 8, device="cuda")
        got = ops.compose(coarse, patches, idx, valid, [4, 8], src)
        want = reference.compose(coarse, patches, idx, valid, (4, 8), src)
        assert_matches_cuda_reference(got, want, "compose")

    def test_compose_keeps_nan_and_rounds_like_matting_refine(self):
        coarse = torch.rand(1, 4, 4, 4, device="cuda")
        coarse[0, 0, 1, 1] = float("nan")
        coarse[0, 2, 2, 2] = float("nan")
        src = torch.rand(1, 3, 16, 16, device="cuda")
        empty = torch.zeros((0, 3), dtype=torch.long, device="cuda")
        got = ops.compose(coarse, torch.zeros(0, 4, 4, 4, device="cuda"), empty, None, [16, 16], src)
        want = reference.compose(coarse.cpu(), torch.zeros(0, 4, 4, 4), empty.cpu(), None, (16, 16), src.cpu())
        assert bool(torch.isnan(got).any())
        assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want))
        # A refined cell over NaN in the coarse map is its patch's value.
        patch = torch.rand(1, 4, 4, 4, device="cuda")
        cell = torch.tensor([[0, 1, 1]], device="cuda")
        got = ops.compose(coarse, patch, cell, None, [16, 16], None)
        assert torch.equal(got[0, :, 4:8, 4:8], patch[0])
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            coarse = (torch.randn(2, 4, 6, 7, device="cuda") * 2).to(dtype)
            src = torch.rand(2, 3, 24, 28, device="cuda").to(dtype)
            e = torch.zeros((0, 3), dtype=torch.long, device="cuda")
            got = ops.compose(coarse, torch.zeros(0, 4, 4, 4, dtype=dtype, device="cuda"), e, None, [24, 28], src)
            up = F.interpolate(coarse, (24, 28), mode="bilinear", align_corners=False)
            want = torch.cat([up[:, :1].clamp(0, 1), up[:, 1:].add(src).clamp(0, 1)], 1)
            assert_matches_cuda_reference(got, want, str(dtype), cancellation=True)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("storage_offset", [0, 1, 2])
    @pytest.mark.parametrize("s", [4, 3])
    def test_compose_into_writes_what_compose_returns(self, dtype, storage_offset, s):
        # out may start anywhere in its storage: the vector stores then give way.
        B, H, W = 2, 12 * s, 10 * s
        coarse = torch.rand(B, 4, 7, 9).to(dtype).cuda()
        _, patches, idx, valid = cuda_replace_case(B, 4, H, W, 30, s, dtype)
        src = torch.rand(B, 3, H, W).to(dtype).cuda()
        want = ops.compose(coarse, patches, idx, valid, [H, W], src)
        flat = torch.full((storage_offset + B * 4 * H * W,), float("nan"), dtype=dtype, device="cuda")
        out = flat[storage_offset:].view(B, 4, H, W)
        assert ops.compose_into(coarse, patches, idx, valid, src, out) is None
        assert torch.equal(out, want)
        assert bool(flat[:storage_offset].isnan().all())


# -- the CPU kernels' AVX2 paths ----------------------------------------------------

class TestCPUVector:
    """The CPU kernels' AVX2 path of compose against its portable loops, bit
    for bit (see test_crop.py's TestCPUVector)."""

    pytestmark = CPU_VECTOR

    def test_compose_vector_paths_match_portable_loops_bitwise(self):
        check_vector_paths_match_portable_loops(vector_compose_results)

    def test_compose_vector_cases_match_reference(self):
        for name, coarse, patches, idx, valid, size, src, _ in vector_compose_cases():
            got = pm.compose(coarse, patches, idx, valid, size, src, backend="cpu")
            want = reference.compose(coarse, patches, idx, valid, size, src)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6, equal_nan=True, msg=name)
