"""How the Triton ops launch, beyond what they compute (test_ops.py): no
growth of torch's Triton kernel side table over eager calls, the same
results call after call, the tensors' device and the current stream, a
bounded number of compiled variants over a video, warmup, the 16-bit keys of
select_sampling, and bad idx rows in the raw crop.

Without a GPU, the compiled-mode launch path (triton_op bodies, the
wrap_triton switch, torch.compile's tracing of the launches) is exercised on
CPU tensors in a subprocess that defines the kernels compiled
(TRITON_INTERPRET=0) and runs each launch through Triton's interpreter.

The helpers (``op_calls``, ``side_table_sizes``,
``assert_no_side_table_growth``, ``compiled_variant_counts``) are for the
GPU tests too.
"""
import os
import subprocess
import sys

import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import BACKEND_CASES, needs_cuda
from helpers import random_bn_, refiner_inputs

TRITON_CASES = [c for c in BACKEND_CASES if c.values[1] == "triton"]

OP_NAMES = ("select_sampling", "select_thresholding", "crop", "crop_into", "replace", "compose", "compose_into")


# -- helpers -------------------------------------------------------------------

def side_table_sizes():
    """(kernels, constant-argument entries) in torch's Triton kernel side
    table, which wrap_triton's traceable launches append to; None where the
    installed torch has no such table."""
    try:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    except ImportError:
        return None
    return len(kernel_side_table.id_to_kernel), len(kernel_side_table.constant_args)


def op_inputs(device, dtype=torch.float32, seed=0):
    """Small arguments for every Triton op, with repeated cells and several
    chunks' worth of ties, on `device`."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(shape, generator=g).to(device, dtype)

    err = (rand(2, 1, 9, 13) * 4).floor() / 4
    _, idx, valid = reference.select_sampling(err.cpu().float(), 30, True)
    idx = torch.cat([idx, idx[:5]]).to(device)     # repeated cells: the last wins
    valid = torch.cat([valid, valid[:5]]).to(device)
    P = idx.shape[0]
    hid, pha = rand(2, 5, 9, 13), rand(2, 1, 9, 13)
    src, bgr = rand(2, 3, 36, 52), rand(2, 3, 36, 52)
    return dict(err=err, idx=idx, valid=valid, hid=hid, pha=pha, src=src, bgr=bgr,
                patches=rand(P, 4, 4, 4), coarse=rand(2, 4, 9, 13), x=rand(2, 4, 36, 52),
                out=torch.full((P, 9, 8, 8), float("nan"), dtype=dtype, device=device).contiguous(
                    memory_format=torch.channels_last))


def op_calls(device, dtype=torch.float32):
    """{op name: a function calling torch.ops.pymatting_ext_triton.<op> on
    op_inputs and returning its outputs as a tuple}."""
    ops = torch.ops.pymatting_ext_triton
    a = op_inputs(device, dtype)

    def crop_into():
        out = a["out"].clone()
        ops.crop_into([a["src"], a["bgr"]], a["idx"], 4, 2, [36, 52], 2, out)
        return (out,)

    def compose_into():
        out = torch.full_like(a["x"], float("nan"))
        ops.compose_into(a["coarse"], a["patches"], a["idx"], a["valid"], a["src"][:, :3], out)
        return (out,)

    return {
        "select_sampling": lambda: tuple(ops.select_sampling(a["err"], 40, True)),
        "select_thresholding": lambda: tuple(ops.select_thresholding(a["err"], 0.5)),
        "crop": lambda: (ops.crop([a["hid"], a["pha"], a["src"], a["bgr"]], a["idx"], 2, 3, [18, 26], [8, 8]),),
        "crop_into": crop_into,
        "replace": lambda: (ops.replace(a["x"], a["patches"], a["idx"], a["valid"]),),
        "compose": lambda: (ops.compose(a["coarse"], a["patches"], a["idx"], a["valid"], [36, 52],
                                        a["src"][:, :3]),),
        "compose_into": compose_into,
    }


def assert_no_side_table_growth(calls, repeats=3):
    """Eager calls of every op in `calls` ({name: fn}) leave torch's kernel
    side table as it was (after a first round that may compile)."""
    for fn in calls.values():
        fn()
    before = side_table_sizes()
    for _ in range(repeats):
        for name, fn in calls.items():
            fn()
            assert side_table_sizes() == before, f"{name} added to torch's Triton kernel side table"


def same(a, b):
    """Bitwise equal tensors, NaN included."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def compiled_variant_counts():
    """{kernel: compiled variants}; empty under the interpreter."""
    from pymatting_ext import triton_kernels
    return triton_kernels.compiled_variants()


def _needs_compiled_triton():
    from pymatting_ext import triton_kernels
    if not triton_kernels.compiled():
        pytest.skip("the Triton kernels are interpreted here (no GPU): nothing is compiled")


# -- side table, determinism, devices and streams --------------------------------

@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_eager_calls_do_not_grow_the_kernel_side_table(device, backend):
    if side_table_sizes() is None:
        pytest.skip("this torch has no Triton kernel side table")
    assert_no_side_table_growth(op_calls(device))


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_op_is_deterministic(device, backend, dtype):
    for name, fn in op_calls(device, dtype).items():
        first = fn()
        for _ in range(4):
            assert all(same(a, b) for a, b in zip(first, fn())), name


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: tensors on cuda:1 while cuda:0 is current")
def test_ops_run_on_their_tensors_device():
    with torch.cuda.device(1):
        want = {name: fn() for name, fn in op_calls("cuda:1").items()}
    with torch.cuda.device(0):
        got = {name: fn() for name, fn in op_calls("cuda:1").items()}
        refiner = random_bn_(pm.Refiner("sampling", 16 * 40, 0.4, backend="triton")).to("cuda:1").eval()
        x = refiner_inputs(2, 64, 96, 16, 24, "cuda:1")
        with torch.no_grad():
            out = refiner(*x)
    torch.cuda.synchronize(1)
    for name in want:
        for a, b in zip(want[name], got[name]):
            assert b.device == torch.device("cuda:1"), name
            assert same(a.cpu(), b.cpu()), name
    with torch.cuda.device(1), torch.no_grad():
        again = refiner(*x)
    for a, b in zip(out, again):
        assert torch.equal(a, b)


@needs_cuda
def test_ops_run_on_the_current_stream():
    want = {name: fn() for name, fn in op_calls("cuda").items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # A long kernel first: a launch on another stream would read or race
        # with unfinished work.
        torch.cuda._sleep(10_000_000)
        got = {name: fn() for name, fn in op_calls("cuda").items()}
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name in want:
        for a, b in zip(want[name], got[name]):
            assert same(a.cpu(), b.cpu()), name


# -- compiled variants and warmup -----------------------------------------------

@needs_cuda
@pytest.mark.parametrize("mode", ["sampling", "thresholding", "full"])
def test_compiled_variants_stay_bounded_over_a_video(mode):
    _needs_compiled_triton()
    refiner = random_bn_(pm.Refiner(mode, 80_000, 0.1, backend="triton")).cuda().eval()
    counts = []
    with torch.no_grad():
        for frame in range(10):
            torch.manual_seed(frame)
            refiner(*refiner_inputs(1, 1080, 1920, 270, 480, "cuda"))
            counts.append(sum(compiled_variant_counts().values()))
    # Everything compiles on the first frame; the next nine reuse it.
    assert counts == counts[:1] * 10, counts


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_warmup_compiles_what_an_hd_frame_needs(dtype):
    _needs_compiled_triton()
    after_warmup = pm.warmup("cuda", dtype)
    assert after_warmup and all(n >= 0 for n in after_warmup.values())
    with torch.no_grad():
        for mode in ("sampling", "thresholding", "full"):
            refiner = random_bn_(pm.Refiner(mode, 80_000, 0.1, backend="triton")).to("cuda", dtype).eval()
            x = refiner_inputs(1, 1080, 1920, 270, 480, "cuda", dtype)
            refiner(*x)
            refiner.forward_matting(*x)
    assert compiled_variant_counts() == after_warmup


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_warmup_runs_under_the_interpreter(device, backend):
    from pymatting_ext import triton_kernels
    if triton_kernels.compiled():
        pytest.skip("covered by test_warmup_compiles_what_an_hd_frame_needs")
    assert pm.warmup("cpu", torch.float32, modes=("sampling",), epilogue=False) == {}


# -- select_sampling's keys -------------------------------------------------------

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


# -- crop's bad rows ------------------------------------------------------------

@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_raw_crop_writes_zeros_for_rows_out_of_range(device, backend):
    # The public ops reject such rows; the raw op must still neither read
    # outside its inputs nor leave the patch unwritten.
    x = torch.rand(2, 3, 10, 14, device=device) + 1
    src = torch.rand(2, 3, 20, 28, device=device) + 1
    idx = torch.tensor([[0, 1, 1], [2, 1, 1], [-1, 0, 0], [1, 10, 0], [1, 0, 14], [1, -1, 3], [1, 9, 13]],
                       device=device)
    out = torch.ops.pymatting_ext_triton.crop([x, src], idx, 2, 3, [20, 28], [8, 8])
    good = reference.crop([x.cpu(), src.cpu()], idx[[0, 6]].cpu(), 2, 3, (20, 28), (8, 8))
    torch.testing.assert_close(out[[0, 6]].cpu(), good, atol=1e-6, rtol=0)
    assert bool((out[1:6] == 0).all())


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_crop_into_with_many_inputs_and_sizes(device, backend, dtype):
    # More inputs of one size than a launch takes (3), more sizes than it
    # takes (2), channel counts that are not powers of two or exceed a tile's
    # 8: several launches, each writing only its channels of out.
    g = torch.Generator().manual_seed(0)
    shapes = [(11, 9, 13), (1, 9, 13), (3, 36, 52), (2, 9, 13), (5, 18, 26), (9, 9, 13), (3, 36, 52),
              (1, 7, 5)]
    inputs = [torch.rand((2,) + s, generator=g).to(device, dtype) for s in shapes]
    C = sum(s[0] for s in shapes)
    _, idx, _ = reference.select_sampling(torch.rand(2, 1, 9, 13, generator=g), 20, False)
    idx = idx.to(device)
    out = torch.full((idx.shape[0], C + 7, 8, 8), float("nan"), dtype=dtype, device=device)
    out = out.contiguous(memory_format=torch.channels_last)
    torch.ops.pymatting_ext_triton.crop_into(inputs, idx, 2, 3, [18, 26], 4, out)
    want = reference.crop([t.cpu() for t in inputs], idx.cpu(), 2, 3, (18, 26), (8, 8))
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(out[:, 4:4 + C].cpu(), want, atol=atol, rtol=0)
    assert bool(out[:, :4].isnan().all()) and bool(out[:, 4 + C:].isnan().all())


# -- the compiled-mode launch path, on CPU ----------------------------------------

def test_compiled_launch_path_on_cpu():
    """The kernels defined compiled (TRITON_INTERPRET=0), as on a GPU, and
    each launch run by Triton's interpreter on CPU tensors: the ops are
    triton_ops, torch finds their kernels, eager calls launch them directly
    (the side table does not grow) and compute what the reference does, and
    torch.compile traces through the launches (aot_eager)."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1200,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled-mode launch path: ok" in proc.stdout


def _run_compiled_launches_through_the_interpreter():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        return InterpretedFunction(self.fn).run(*args, grid=grid, warmup=warmup, **kwargs)

    def call(self, *args, **kwargs):  # a @triton.jit helper called by a kernel
        return InterpretedFunction(self.fn)(*args, **kwargs)

    JITFunction.run = run
    JITFunction.__call__ = call


def _compiled_path_main():
    _run_compiled_launches_through_the_interpreter()
    from torch._library.triton import get_triton_kernels_for_op

    from pymatting_ext import _triton
    assert _triton.TRACEABLE, "the kernels should be defined compiled here"
    # torch finds each triton_op's kernels (for its compile cache keys).
    want = {"select_sampling": {"_radix_histogram_kernel", "_radix_count_kernel", "_radix_write_kernel"},
            "crop": {"_crop_kernel"}, "crop_into": {"_crop_kernel"},
            "replace": {"_cell_map_kernel", "_replace_kernel"}, "compose": {"_cell_map_kernel", "_compose_kernel"},
            "compose_into": {"_cell_map_kernel", "_compose_kernel"}}
    for name, kernels in want.items():
        found = {k.fn.__name__ for k in get_triton_kernels_for_op(f"pymatting_ext_triton::{name}")}
        assert found == kernels, (name, found)

    calls = op_calls("cpu")
    a = op_inputs("cpu")
    results = {name: fn() for name, fn in calls.items()}
    ref = reference
    expected = {
        "select_sampling": ref.select_sampling(a["err"], 40, True),
        "select_thresholding": ref.select_thresholding(a["err"], 0.5),
        "crop": (ref.crop([a["hid"], a["pha"], a["src"], a["bgr"]], a["idx"], 2, 3, (18, 26), (8, 8)),),
        "replace": (ref.replace(a["x"], a["patches"], a["idx"], a["valid"]),),
        "compose": (ref.compose(a["coarse"], a["patches"], a["idx"], a["valid"], (36, 52), a["src"][:, :3]),),
    }
    out = a["out"].clone()
    ref.crop_into([a["src"], a["bgr"]], a["idx"], 4, 2, (36, 52), 2, out)
    expected["crop_into"] = (out,)
    expected["compose_into"] = expected["compose"]
    for name, want_out in expected.items():
        for g, w in zip(results[name], want_out):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=0, equal_nan=True, msg=name)
    if side_table_sizes() is not None:
        assert_no_side_table_growth(calls, repeats=2)

    # Traced: fake tensors take torch's wrap_triton path, the graph launches
    # the kernels through its higher-order op.
    for name in ("crop", "crop_into", "compose", "compose_into", "select_sampling"):
        fn = calls[name]
        torch._dynamo.reset()
        traced = torch.compile(fn, backend="aot_eager", fullgraph=True)()
        for g, w in zip(traced, fn()):
            torch.testing.assert_close(g, w, atol=0, rtol=0, equal_nan=True, msg=name)
    print("compiled-mode launch path: ok")


if __name__ == "__main__":
    _compiled_path_main()
