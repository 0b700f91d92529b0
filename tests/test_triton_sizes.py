"""The Triton kernels at the edges of their sizes and compile options:
select_sampling's launches for any batch size (grid axes within CUDA's
limits, scratch for one slice of the batch), the resize scale computed in
the kernels from the integer sizes (bit for bit ATen's, no size specialised
under torch.compile), and the pinned floating-point fusion setting.

A batch past 65,535 images cannot run through the interpreter in test time:
its launch arithmetic is checked by intercepting the launches, and the
slicing itself runs end to end with the slice forced small.
"""
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import BACKEND_CASES

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
# NB: imported after conftest, which chooses the interpreter where there is
# no GPU (the package's __init__ exports functions named like its modules).
common = importlib.import_module("pymatting_ext.triton_kernels.common")
select = importlib.import_module("pymatting_ext.triton_kernels.select")
resize_scale = common.resize_scale

TRITON_CASES = [c for c in BACKEND_CASES if c.values[1] == "triton"]

#: CUDA's grid limits: axis 0, and axes 1 and 2.
MAX_GRID_X = 2 ** 31 - 1
MAX_GRID_YZ = 65535


# -- select_sampling: any batch size ---------------------------------------------

def _scratch_bytes(images, groups):
    return images * 4 * 256 * 8 + images * groups * 2 * 4


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


# -- the resize scale ------------------------------------------------------------

#: (input size, output size) pairs: the refiner's x2 and /2 at odd sizes,
#: odd ratios both ways, and sizes past 2^24, which float32 rounds before
#: the division (as ATen does: static_cast<float>(input_size) / output_size).
SCALE_PAIRS = [(9, 18), (27, 54), (135, 270), (13, 52), (7, 20), (30, 41), (41, 164), (5, 8), (20, 7),
               (121, 3), (1, 4), (3, 1), (2 ** 24 + 1, 3), (2 ** 24 + 3, 8), (2 ** 24 + 1, 20), (2 ** 24 + 1, 5),
               (2 ** 24 + 1, 2 ** 24 - 1),
               (2 ** 31 - 1, 7), (2 ** 31 - 1, 2 ** 31 - 3)]


def _aten_scale(in_size, out_size):
    return np.float32(in_size) / np.float32(out_size)


@triton.jit
def _scale_probe(in_ptr, out_ptr, scale_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(scale_ptr + i, resize_scale(tl.load(in_ptr + i), tl.load(out_ptr + i)))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_resize_scale_is_atens_float32_division(device, backend):
    n = triton.next_power_of_2(len(SCALE_PAIRS))
    pairs = SCALE_PAIRS + [(1, 1)] * (n - len(SCALE_PAIRS))
    sizes = torch.tensor(pairs, dtype=torch.int64, device=device)
    got = torch.empty(n, dtype=torch.float32, device=device)
    _scale_probe[(1,)](sizes[:, 0].contiguous(), sizes[:, 1].contiguous(), got, BLOCK=n)
    want = np.array([_aten_scale(a, b) for a, b in pairs], dtype=np.float32)
    assert np.array_equal(got.cpu().numpy().view(np.int32), want.view(np.int32))
    # The pairs tell the formulas apart: the exact ratio rounded once is
    # another float for the sizes past 2^24.
    exact = np.array([np.float32(a / b) for a, b in pairs], dtype=np.float32)
    assert not np.array_equal(exact, want)


def _alternating(n, axis, other=4):
    """A (1, 1, ., .) tensor of n values 0, 1, 0, 1, ... along `axis` (2 or
    3), repeated `other` times along the other axis (a stride-0 view). A
    bilinear mix of two neighbours is then one weight times 1 plus 0, exact
    whatever the order of the operations, so a resize of it shows its
    weights and taps bit for bit."""
    row = (torch.arange(n) % 2).float()
    return row.view(1, 1, n, 1).expand(1, 1, n, other) if axis == 2 else row.view(1, 1, 1, n).expand(1, 1, other, n)


def _resize_alternating(n_in, n_out, scale, fma):
    """One axis of PyTorch's bilinear resize (align_corners=False) of the
    alternating values, in float32, step by step as csrc/index_math.h's
    linear_tap and linear_mix. fma: the source coordinate
    scale * (dst + 0.5) - 0.5 rounded once, as a fused multiply-add does
    (computed in float64, where it is exact for these sizes, then rounded)."""
    f32 = np.float32
    dst = np.arange(n_out, dtype=f32)
    if fma:
        src = f32(np.float64(scale) * (np.float64(dst) + 0.5) - 0.5)
    else:
        src = f32(scale) * (dst + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
    i1 = i0 + (i0 < n_in - 1)
    return (f32(1) - lam) * (i0 % 2).astype(f32) + lam * (i1 % 2).astype(f32)


#: (input size, output size) along one axis: the refiner's x4 up and /2 down
#: at odd sizes (dyadic scales: every product exact), non-dyadic ratios both
#: ways, and a size past 2^24 whose float32 rounding changes the result.
#: Outputs are multiples of compose's cell size, 4.
RESIZE_PAIRS = [(9, 36), (27, 108), (72, 36), (7, 20), (30, 164), (13, 8), (2 ** 24 + 1, 20)]
DYADIC = {(9, 36), (27, 108), (72, 36)}


def _as_axis(values, axis, other=4):
    t = torch.from_numpy(values)
    n = t.numel()
    return t.view(1, 1, n, 1).expand(1, 1, n, other) if axis == 2 else t.view(1, 1, 1, n).expand(1, 1, other, n)


def test_interpolate_uses_the_float32_scale_of_the_sizes():
    # What the kernels must reproduce: F.interpolate's weights at these
    # sizes are those of scale = float32(in) / float32(out) (ATen's
    # area_pixel_compute_scale), not of the exact ratio. NB: this torch's
    # CPU upsample computes the source coordinate with a fused multiply-add
    # (so do nvcc's CUDA builds by default), where csrc/index_math.h and the
    # Triton kernels (FP_FUSION) round twice: either rounding is accepted
    # here, the scale is what is tested.
    for axis in (3, 2):
        for n_in, n_out in RESIZE_PAIRS:
            size = [4, 4]
            size[axis - 2] = n_out
            got = F.interpolate(_alternating(n_in, axis), size, mode="bilinear", align_corners=False)
            line = (got[0, 0, :, 0] if axis == 2 else got[0, 0, 0]).numpy()
            scale = _aten_scale(n_in, n_out)
            assert any(np.array_equal(line, _resize_alternating(n_in, n_out, scale, fma)) for fma in (True, False)), \
                (n_in, n_out, axis)
            if n_in > 2 ** 24:
                exact = np.float32(n_in / n_out)
                assert exact != scale
                assert not any(np.array_equal(line, _resize_alternating(n_in, n_out, exact, fma))
                               for fma in (True, False))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("axis", [2, 3])
def test_compose_resizes_with_the_scale_of_the_sizes(device, backend, axis):
    # compose without refined cells is the bilinear upsample of coarse, with
    # the scale computed in the kernel from the sizes: bit for bit the
    # formula of csrc/index_math.h with ATen's scale, and F.interpolate
    # itself where the scale is dyadic (no rounding for an FMA to skip).
    empty = torch.zeros((0, 3), dtype=torch.int64, device=device)
    for n_in, n_out in RESIZE_PAIRS:
        size = [4, 4]
        size[axis - 2] = n_out
        coarse = _alternating(n_in, axis).to(device)
        got = torch.ops.pymatting_ext_triton.compose(coarse, torch.zeros(0, 1, 4, 4, device=device), empty, None,
                                                     size, None).cpu()
        want = _as_axis(_resize_alternating(n_in, n_out, _aten_scale(n_in, n_out), False), axis)
        assert torch.equal(got, want), (n_in, n_out, axis)
        if (n_in, n_out) in DYADIC:
            assert torch.equal(got, F.interpolate(coarse.cpu(), size, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("axis", [2, 3])
def test_crop_resamples_with_the_scale_of_the_sizes(device, backend, axis):
    # The same through crop: its patches of the resized input equal those
    # of the resized image built by the formula (read without resampling).
    for n_in, n_out in [(9, 18), (27, 54), (26, 13), (7, 20), (30, 41), (13, 8)]:
        x = _alternating(n_in, axis, 12).to(device)
        image = [12, 12]
        image[axis - 2] = n_out
        resized = _as_axis(_resize_alternating(n_in, n_out, _aten_scale(n_in, n_out), False), axis, 12)
        cells = [-(-s // 2) for s in image]
        idx = torch.tensor([[0, y, x] for y in range(cells[0]) for x in range(cells[1])])
        got = torch.ops.pymatting_ext_triton.crop([x], idx.to(device), 2, 3, image, [8, 8])
        want = reference.crop([resized.contiguous()], idx, 2, 3, tuple(image), (8, 8))
        assert torch.equal(got.cpu(), want), (n_in, n_out, axis)


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


# -- floating-point fusion ----------------------------------------------------------

#: Every kernel the launchers of select, crop, replace and compose launch.
PINNED_KERNELS = {"_radix_histogram_kernel", "_radix_count_kernel", "_radix_write_kernel",
                  "_threshold_count_kernel", "_threshold_write_kernel", "_crop_kernel", "_cell_map_kernel",
                  "_replace_kernel", "_compose_kernel"}


def test_fp_fusion_is_pinned_off():
    # The decision (see common.FP_FUSION): no fused multiply-adds, so the
    # GPU rounds as the interpreter that CI tests with does.
    assert common.FP_FUSION is False


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_every_launch_passes_the_pinned_fp_fusion(device, backend, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from test_triton_launch import op_calls

    kernel_class = JITFunction if common.compiled() else InterpretedFunction
    seen = {}
    real = kernel_class.run

    def run(self, *args, **kwargs):
        seen.setdefault(self.fn.__name__, set()).add(kwargs.get("enable_fp_fusion", "not passed"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", run)
    for fn in op_calls(device).values():
        fn()
    assert set(seen) == PINNED_KERNELS
    assert all(values == {False} for values in seen.values()), seen


def test_compiled_launches_pin_fp_fusion_and_sizes_stay_symbolic():
    """In a subprocess where the kernels are defined compiled (as on a GPU)
    and each launch runs through the interpreter: the options every launch
    passes, eager and traced by torch.compile; those options compiled for
    sm_90 give PTX without fused multiply-adds (and with them, fused ones);
    and torch.compile(dynamic=True) runs the ops at two image sizes without
    recompiling."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled launches: ok" in proc.stdout


def _ptx_of(kernel, signature, constexprs, options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ptx"]


def _check_ptx(launch_options):
    """compose's and crop's resampling kernels compiled for sm_90 with the
    options their launches passed."""
    import importlib

    compose = importlib.import_module("pymatting_ext.triton_kernels.compose")
    crop = importlib.import_module("pymatting_ext.triton_kernels.crop")
    ints = {name: "i32" for name in compose._compose_kernel.arg_names}
    compose_sig = {**ints, "coarse_ptr": "*fp32", "patch_ptr": "*fp32", "cell_ptr": "*i32", "src_ptr": "*fp32",
                   "out_ptr": "*fp32"}
    compose_meta = {"S": 4, "SAME": False, "EPILOGUE": True, "ROUND": False, "ROWS": 1, "BLOCK": 256}
    crop_sig = {**{name: "i32" for name in crop._crop_kernel.arg_names}, "idx_ptr": "*i64", "out_ptr": "*fp32",
                **{f"x{i}": "*fp32" for i in range(6)}}
    crop_meta = {**{f"CB{i}": 1 for i in range(6)}, "NA": 1, "NB": 1, "RESAMPLE_A": True, "RESAMPLE_B": True,
                 "CB0": 8, "CB3": 4, "ROUND": False, "WIDE": False, "BLOCK": 128}
    fma = re.compile(r"\b(fma|mad)\.rn(\.ftz)?\.f32\b")
    for kernel, sig, meta in ((compose._compose_kernel, compose_sig, compose_meta),
                              (crop._crop_kernel, crop_sig, crop_meta)):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        options = {k: v for k, v in launch_options[name].items() if k == "enable_fp_fusion"}
        assert options == {"enable_fp_fusion": False}, (name, options)
        ptx = _ptx_of(kernel, sig, meta, options)
        assert not fma.search(ptx), f"{name}: fused multiply-add in the PTX"
        # The scale: a correctly rounded division, not the approximate one.
        assert "div.rn.f32" in ptx and "div.full.f32" not in ptx, name
        # The option is what decides it: with fusion, the same code fuses.
        assert fma.search(_ptx_of(kernel, sig, meta, {"enable_fp_fusion": True})), name


def _compiled_main():
    from triton.runtime.jit import JITFunction

    from test_triton_launch import _run_compiled_launches_through_the_interpreter, op_calls

    from pymatting_ext import _triton
    assert _triton.TRACEABLE
    calls = op_calls("cpu")

    # The options crop's and compose's launches pass, recorded without
    # running them, compiled for sm_90. NB: before the interpreter runs
    # anything: it leaves Triton's language patched for the compiler.
    recorded = {}

    def record(self, *args, grid, warmup, **kwargs):
        recorded.setdefault(self.fn.__name__, {}).update(
            {k: v for k, v in kwargs.items() if k not in self.arg_names})

    compiling = JITFunction.run
    JITFunction.run = record
    calls["crop"]()
    calls["compose"]()
    JITFunction.run = compiling
    _check_ptx(recorded)

    # Every launch, run through the interpreter: eager, then traced.
    _run_compiled_launches_through_the_interpreter()
    interpreted = JITFunction.run
    seen = set()

    def run(self, *args, grid, warmup, **kwargs):
        seen.add((self.fn.__name__, kwargs.get("enable_fp_fusion", "not passed")))
        return interpreted(self, *args, grid=grid, warmup=warmup, **kwargs)

    JITFunction.run = run
    for fn in calls.values():
        fn()
    assert {name for name, _ in seen} == PINNED_KERNELS, seen
    assert {value for _, value in seen} == {False}, seen

    # Traced: the graph's launches keep the option where torch keeps
    # launch-time compile options (common._torch_keeps_compile_options).
    keeps = common._torch_keeps_compile_options()
    seen.clear()
    for name in ("crop", "compose", "replace", "select_sampling"):
        torch._dynamo.reset()
        torch.compile(calls[name], backend="aot_eager", fullgraph=True)()
    assert {value for _, value in seen} == ({False} if keeps else {"not passed"}), seen
    print(f"torch keeps launch compile options through torch.compile: {keeps}")

    _check_dynamic_sizes()
    print("compiled launches: ok")


def _ops_at_size(err, hid, src, coarse_channels):
    """select_sampling, crop, compose and replace chained as the refiner
    chains them, at the size of the inputs."""
    ops = torch.ops.pymatting_ext_triton
    H, W = src.shape[2], src.shape[3]
    ref, idx, valid = ops.select_sampling(err, 12, True)
    patches = ops.crop([hid, src], idx, 2, 3, [H // 2, W // 2], [8, 8])
    small = patches[:, :coarse_channels, 2:6, 2:6].contiguous()
    out = ops.compose(hid[:, :coarse_channels], small, idx, valid, [H, W], src[:, :coarse_channels - 1])
    again = ops.replace(out, small, idx, valid)
    return ref, idx, patches, out, again


def _size_inputs(B, Hc, Wc, seed):
    g = torch.Generator().manual_seed(seed)
    err = torch.rand(B, 1, Hc, Wc, generator=g)
    hid = torch.rand(B, 5, Hc, Wc, generator=g)
    src = torch.rand(B, 3, 4 * Hc, 4 * Wc, generator=g)
    return err, hid, src, 4


def _check_dynamic_sizes():
    import torch._dynamo

    from helpers import random_bn_, refiner_inputs

    torch._dynamo.reset()
    compiled = torch.compile(_ops_at_size, backend="aot_eager", dynamic=True, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for B, Hc, Wc, seed in ((2, 9, 13, 0), (3, 11, 17, 1), (2, 6, 22, 2)):
            args = _size_inputs(B, Hc, Wc, seed)
            for a, b in zip(compiled(*args), _ops_at_size(*args)):
                torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    print("torch.compile(dynamic=True) of the ops: three image and two batch sizes, one graph")

    # The whole Refiner. NB: its backend check lets CPU tensors through
    # only under TRITON_INTERPRET=1; the kernels are defined compiled by now.
    os.environ["TRITON_INTERPRET"] = "1"
    torch._dynamo.reset()
    refiner = random_bn_(pm.Refiner("sampling", 16 * 40, 0.4, backend="triton")).eval()
    compiled = torch.compile(refiner, backend="aot_eager", dynamic=True, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for B, H, W in ((2, 64, 96), (3, 80, 112)):
            x = refiner_inputs(B, H, W, H // 4, W // 4, "cpu")
            for a, b in zip(compiled(*x), refiner(*x)):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    print("torch.compile(dynamic=True) of the Refiner: two image and batch sizes, one graph")


if __name__ == "__main__":
    _compiled_main()
