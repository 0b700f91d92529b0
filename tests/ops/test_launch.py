"""How every op launches, beyond what it computes (test_select.py,
test_crop.py, test_compose_replace.py): on the current stream and on its
tensors' device, the same bits call after call, non-contiguous idx and valid,
no host synchronisation (the CUDA kernels' patch ops), no growth of torch's
Triton kernel side table over eager calls, and floating-point fusion pinned
off on every Triton launch (eager and traced; PTX without fused multiply-adds
for sm_90).

Without a GPU, the compiled-mode launch path (triton_op bodies, the
wrap_triton switch, torch.compile's tracing of the launches, and
torch.compile(dynamic=True) without recompiles) is exercised on CPU tensors
in a subprocess that runs this file as a script: the kernels defined
compiled (TRITON_INTERPRET=0) and each launch run through Triton's
interpreter."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import CUDA_KERNELS, GPU_CASES, TRITON_CASES, needs_cuda
from helpers import TESTS_DIR, cuda_replace_case, op_calls, random_bn_, refiner_inputs

ops = torch.ops.pymatting_ext

try:
    import triton  # noqa: F401
except ImportError:
    common = None
else:
    # NB: imported after conftest, which chooses the interpreter where there
    # is no GPU (the package's __init__ exports functions named like its
    # modules).
    common = importlib.import_module("pymatting_ext.triton_kernels.common")


def _script_env():
    """The environment of this file run as a script (its __main__, below) in
    compiled mode: TRITON_INTERPRET=0, and tests/ on the path (conftest,
    helpers)."""
    return dict(os.environ, TRITON_INTERPRET="0",
                PYTHONPATH=os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p))


# -- the Triton ops' calls --------------------------------------------------------

def side_table_sizes():
    """(kernels, constant-argument entries) in torch's Triton kernel side
    table, which wrap_triton's traceable launches append to; None where the
    installed torch has no such table."""
    try:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    except ImportError:
        return None
    return len(kernel_side_table.id_to_kernel), len(kernel_side_table.constant_args)


def triton_op_inputs(device, dtype=torch.float32, seed=0):
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


def triton_op_calls(device, dtype=torch.float32):
    """{op name: a function calling torch.ops.pymatting_ext_triton.<op> on
    triton_op_inputs and returning its outputs as a tuple}."""
    ops = torch.ops.pymatting_ext_triton
    a = triton_op_inputs(device, dtype)

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


# -- streams and devices ---------------------------------------------------------

@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_every_op_runs_on_the_current_stream(device, backend):
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


@needs_cuda
def test_ops_run_on_the_current_stream():
    want = {name: fn() for name, fn in triton_op_calls("cuda").items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # A long kernel first: a launch on another stream would read or race
        # with unfinished work.
        torch.cuda._sleep(10_000_000)
        got = {name: fn() for name, fn in triton_op_calls("cuda").items()}
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name in want:
        for a, b in zip(want[name], got[name]):
            assert same(a.cpu(), b.cpu()), name


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: tensors on cuda:1 while cuda:0 is current")
def test_ops_run_on_their_tensors_device():
    with torch.cuda.device(1):
        want = {name: fn() for name, fn in triton_op_calls("cuda:1").items()}
    with torch.cuda.device(0):
        got = {name: fn() for name, fn in triton_op_calls("cuda:1").items()}
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


# -- the same bits, call after call ----------------------------------------------

@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_op_is_deterministic(device, backend, dtype):
    for name, fn in triton_op_calls(device, dtype).items():
        first = fn()
        for _ in range(4):
            assert all(same(a, b) for a, b in zip(first, fn())), name


# -- non-contiguous idx and valid ------------------------------------------------

@pytest.mark.parametrize("device,backend", GPU_CASES)
def test_non_contiguous_idx_and_valid(device, backend):
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


# -- no host synchronisation ------------------------------------------------------

class TestCUDAKernels:
    """The CUDA kernels (kernels/cuda) through torch.ops.pymatting_ext on CUDA
    tensors."""

    pytestmark = CUDA_KERNELS

    def test_patch_ops_never_synchronise(self):
        x = torch.rand(2, 4, 64, 96, device="cuda")
        _, patches, idx, valid = cuda_replace_case(2, 4, 64, 96, 100, 4, torch.float32)
        coarse = torch.rand(2, 4, 16, 24, device="cuda")
        src = torch.rand(2, 3, 64, 96, device="cuda")

        out = torch.empty(100, 12, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)

        def run():
            ops.crop([coarse, x], idx, 4, 2, [64, 96], [8, 8])
            ops.crop_into([x], idx, 4, 2, [64, 96], 8, out)
            ops.replace(x, patches, idx, valid)
            ops.compose(coarse, patches, idx, valid, [64, 96], src)
            ops.compose_into(coarse, patches, idx, valid, src, composed)

        composed = torch.empty(2, 4, 64, 96, device="cuda")
        run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# -- torch's Triton kernel side table --------------------------------------------

@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_eager_calls_do_not_grow_the_kernel_side_table(device, backend):
    if side_table_sizes() is None:
        pytest.skip("this torch has no Triton kernel side table")
    assert_no_side_table_growth(triton_op_calls(device))


# -- floating-point fusion ----------------------------------------------------------

#: Every kernel the launchers of select, crop, replace and compose launch.
PINNED_KERNELS = {"_radix_histogram_kernel", "_radix_count_kernel", "_radix_write_kernel",
                  "_threshold_count_kernel", "_threshold_write_kernel", "_crop_kernel", "_cell_map_kernel",
                  "_replace_kernel", "_compose_kernel"}


@pytest.mark.skipif(common is None, reason="needs Triton")
def test_fp_fusion_is_pinned_off():
    # The decision (see common.FP_FUSION): no fused multiply-adds, so the
    # GPU rounds as the interpreter that CI tests with does.
    assert common.FP_FUSION is False


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_every_launch_passes_the_pinned_fp_fusion(device, backend, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernel_class = JITFunction if common.compiled() else InterpretedFunction
    seen = {}
    real = kernel_class.run

    def run(self, *args, **kwargs):
        seen.setdefault(self.fn.__name__, set()).add(kwargs.get("enable_fp_fusion", "not passed"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", run)
    for fn in triton_op_calls(device).values():
        fn()
    assert set(seen) == PINNED_KERNELS
    assert all(values == {False} for values in seen.values()), seen


@pytest.mark.skipif(common is None, reason="needs Triton")
def test_compiled_launches_pin_fp_fusion_and_sizes_stay_symbolic():
    """In a subprocess where the kernels are defined compiled (as on a GPU)
    and each launch runs through the interpreter: the options every launch
    passes, eager and traced by torch.compile; those options compiled for
    sm_90 give PTX without fused multiply-adds (and with them, fused ones);
    and torch.compile(dynamic=True) runs the ops at two image sizes without
    recompiling."""
    _run_this_file("fp-fusion", "compiled launches: ok")


# -- the compiled-mode launch path, on CPU ----------------------------------------

def test_compiled_launch_path_on_cpu():
    """The kernels defined compiled (TRITON_INTERPRET=0), as on a GPU, and
    each launch run by Triton's interpreter on CPU tensors: the ops are
    triton_ops, torch finds their kernels, eager calls launch them directly
    (the side table does not grow) and compute what the reference does, and
    torch.compile traces through the launches (aot_eager)."""
    _run_this_file("launch-path", "compiled-mode launch path: ok")


def _run_this_file(what, ok_line):
    """This file run as a script (see the end) with argument `what`, in a
    subprocess; it must exit 0 and print ok_line."""
    proc = subprocess.run([sys.executable, __file__, what], capture_output=True, text=True, env=_script_env(),
                          timeout=1200, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert ok_line in proc.stdout


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

    calls = triton_op_calls("cpu")
    a = triton_op_inputs("cpu")
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

    from pymatting_ext import _triton
    assert _triton.TRACEABLE
    calls = triton_op_calls("cpu")

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
    # The subprocesses of test_compiled_launch_path_on_cpu ("launch-path") and
    # test_compiled_launches_pin_fp_fusion_and_sizes_stay_symbolic ("fp-fusion").
    {"launch-path": _compiled_path_main, "fp-fusion": _compiled_main}[sys.argv[1]]()
