"""Bad arguments to the ops get a clear error naming the argument, from the
public ops and from the raw C++ ops: never a crash or silent garbage; the
CUDA kernels (TestCUDAKernels) give the CPU kernels' messages, and an idx
row out of range on the GPU is a device-side assertion, never a silent
write. (The Refiner's checks: refiner/test_refiner_input.py; crop_into's and
compose_into's out: test_crop.py, test_compose_replace.py; backends that
cannot run: test_backends.py.)"""
import subprocess
import sys
import textwrap

import pytest
import torch

import pymatting_ext as pm

from conftest import CUDA_KERNELS
from helpers import subprocess_env

OPS = torch.ops.pymatting_ext
ERRORS = (ValueError, TypeError, RuntimeError)


def idx_rows(*rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_select_rejects(backend):
    with pytest.raises(ValueError, match="err"):
        pm.select_sampling(torch.rand(1, 2, 4, 4), 3, backend=backend)
    with pytest.raises(ValueError, match="err"):
        pm.select_sampling(torch.rand(1, 4, 4), 3, backend=backend)
    with pytest.raises(ValueError, match="k"):
        pm.select_sampling(torch.rand(1, 1, 4, 4), -1, backend=backend)
    with pytest.raises(ValueError, match="err"):
        pm.select_thresholding(torch.randint(0, 2, (1, 1, 4, 4)), 0.5, backend=backend)
    with pytest.raises(TypeError, match="threshold"):
        pm.select_thresholding(torch.rand(1, 1, 4, 4), "0.5", backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [(-1, 0, 0), (2, 0, 0), (0, -1, 0), (0, 5, 0), (0, 0, 6), (0, 0, -3)])
def test_out_of_range_idx_is_an_error(backend, bad):
    x = torch.rand(2, 3, 20, 24)       # cells of 4: 5 x 6
    idx = idx_rows((0, 1, 1), bad)
    patches = torch.rand(2, 3, 4, 4)
    with pytest.raises(ERRORS, match="idx"):
        pm.crop([x], idx, 4, 2, (20, 24), backend=backend)
    with pytest.raises(ERRORS, match="idx"):
        pm.replace(x, patches, idx, backend=backend)
    with pytest.raises(ERRORS, match="idx"):
        pm.compose(torch.rand(2, 3, 5, 6), patches, idx, None, (20, 24), backend=backend)


@pytest.mark.parametrize("bad", [(-1, 0, 0), (2, 0, 0), (0, 5, 0), (0, 0, 6), (0, -7, 0)])
def test_raw_ops_check_idx_values(bad):
    x = torch.rand(2, 3, 20, 24)
    idx = idx_rows((0, 1, 1), bad)
    patches = torch.rand(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="idx row 1"):
        OPS.crop([x], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="idx row 1"):
        OPS.replace(x, patches, idx, None)
    with pytest.raises(RuntimeError, match="idx row 1"):
        OPS.compose(torch.rand(2, 3, 5, 6), patches, idx, None, [20, 24], None)


def test_raw_ops_check_metadata():
    x = torch.rand(2, 3, 20, 24)
    idx = idx_rows((0, 1, 1))
    with pytest.raises(RuntimeError, match="idx must have shape"):
        OPS.crop([x], idx[:, :2], 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="idx must be int64"):
        OPS.crop([x], idx.int(), 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="inputs"):
        OPS.crop([], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match=r"inputs\[1\]"):
        OPS.crop([x, x.double()], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match=r"inputs\[1\]"):
        OPS.crop([x, x[:1]], idx, 4, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="stride"):
        OPS.crop([x], idx, 0, 2, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="padding"):
        OPS.crop([x], idx, 4, -1, [20, 24], [8, 8])
    with pytest.raises(RuntimeError, match="err"):
        OPS.select_sampling(torch.rand(2, 3, 4, 4), 3, True)
    with pytest.raises(RuntimeError, match="k must be non-negative"):
        OPS.select_sampling(torch.rand(2, 1, 4, 4), -3, True)
    with pytest.raises(RuntimeError, match="err must be float32"):
        OPS.select_thresholding(torch.zeros(2, 1, 4, 4, dtype=torch.int64), 0.5)
    with pytest.raises(RuntimeError, match="patches"):
        OPS.replace(x, torch.rand(1, 2, 4, 4), idx, None)
    with pytest.raises(RuntimeError, match="divisible"):
        OPS.replace(x, torch.rand(1, 3, 7, 7), idx, None)
    with pytest.raises(RuntimeError, match="valid"):
        OPS.replace(x, torch.rand(1, 3, 4, 4), idx, torch.ones(2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="src"):
        OPS.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, [20, 24], torch.rand(2, 3, 20, 20))
    with pytest.raises(RuntimeError, match="size"):
        OPS.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, [22, 24], None)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_public_ops_check_metadata(backend):
    x = torch.rand(2, 3, 20, 24)
    idx = idx_rows((0, 1, 1))
    cases = [
        (lambda: pm.crop([x], idx.int(), 4, 2, (20, 24), backend=backend), "idx"),
        (lambda: pm.crop([x, x.double()], idx, 4, 2, (20, 24), backend=backend), r"inputs\[1\]"),
        (lambda: pm.crop([x, x[:1]], idx, 4, 2, (20, 24), backend=backend), r"inputs\[1\]"),
        (lambda: pm.crop([x[0]], idx, 4, 2, (20, 24), backend=backend), r"inputs\[0\]"),
        (lambda: pm.crop([], idx, 4, 2, (20, 24), backend=backend), "inputs"),
        (lambda: pm.crop([x], idx, 4, 2, (20, 0), backend=backend), "image_size"),
        (lambda: pm.crop([x], idx, 0, 2, (20, 24), backend=backend), "stride"),
        (lambda: pm.replace(x, torch.rand(1, 2, 4, 4), idx, backend=backend), "patches"),
        (lambda: pm.replace(x, torch.rand(1, 3, 4, 4), idx, torch.ones(3, dtype=torch.bool), backend=backend),
         "valid"),
        (lambda: pm.replace(x, torch.rand(2, 3, 4, 4), idx, backend=backend), "idx"),
        (lambda: pm.replace(x, torch.rand(1, 3, 4, 4).double(), idx, backend=backend), "patches"),
        (lambda: pm.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, (20, 24),
                            torch.rand(2, 4, 20, 24), backend=backend), "src"),
        (lambda: pm.compose(torch.rand(2, 4, 5, 6), torch.rand(1, 4, 4, 4), idx, None, (21, 24),
                            backend=backend), "size"),
        (lambda: pm.compose(torch.rand(2, 4, 5, 6).to(torch.complex64), torch.rand(1, 4, 4, 4), idx, None,
                            (20, 24), backend=backend), "coarse"),
    ]
    for call, match in cases:
        with pytest.raises(ERRORS, match=match):
            call()


# -- the CUDA kernels -----------------------------------------------------------

def error_of(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    # The message up to the C++ backtrace/location that follows it.
    return str(info.value).splitlines()[0]


class TestCUDAKernels:
    """The CUDA kernels (kernels/cuda) through torch.ops.pymatting_ext on CUDA
    tensors."""

    pytestmark = CUDA_KERNELS

    def test_argument_checks_match_the_cpu_kernels(self):
        def both(make):
            a = error_of(lambda: make("cpu"))
            b = error_of(lambda: make("cuda"))
            assert a == b, (a, b)

        e = torch.zeros((0, 3), dtype=torch.long)
        both(lambda d: OPS.select_sampling(torch.rand(2, 2, 4, 4, device=d), 3, True))
        both(lambda d: OPS.select_sampling(torch.rand(2, 1, 4, 4, device=d), -1, True))
        both(lambda d: OPS.select_thresholding(torch.rand(2, 1, 4, device=d), 0.5))
        both(lambda d: OPS.crop([torch.rand(2, 3, 4, 4, device=d), torch.rand(3, 3, 4, 4, device=d)],
                                e.to(d), 2, 0, [4, 4], [2, 2]))
        both(lambda d: OPS.crop([torch.rand(2, 3, 4, 4, device=d)], e.to(d), 0, 0, [4, 4], [2, 2]))
        both(lambda d: OPS.replace(torch.rand(2, 3, 8, 8, device=d), torch.rand(1, 2, 4, 4, device=d),
                                   torch.zeros((1, 3), dtype=torch.long, device=d), None))
        both(lambda d: OPS.replace(torch.rand(2, 3, 8, 8, device=d), torch.rand(1, 3, 4, 4, device=d),
                                   torch.zeros((1, 3), dtype=torch.long, device=d), torch.ones(2, dtype=torch.bool,
                                                                                              device=d)))
        both(lambda d: OPS.compose(torch.rand(2, 4, 2, 2, device=d), torch.rand(0, 4, 4, 4, device=d), e.to(d), None,
                                   [8, 8], torch.rand(2, 4, 8, 8, device=d)))
        both(lambda d: OPS.compose(torch.rand(2, 4, 2, 2, device=d), torch.rand(0, 4, 4, 4, device=d), e.to(d), None,
                                   [8, 6], None))

        # A batch of no images with idx rows: every row is out of range, which
        # the CUDA kernels know without their device-side check.
        one = torch.zeros((1, 3), dtype=torch.long)
        both(lambda d: OPS.replace(torch.rand(0, 3, 8, 8, device=d), torch.rand(1, 3, 4, 4, device=d), one.to(d), None))
        both(lambda d: OPS.compose(torch.rand(0, 4, 2, 2, device=d), torch.rand(1, 4, 4, 4, device=d), one.to(d), None,
                                   [8, 8], None))
        both(lambda d: OPS.crop([torch.rand(0, 3, 4, 4, device=d)], one.to(d), 2, 0, [4, 4], [2, 2]))
        both(lambda d: OPS.crop_into([torch.rand(0, 3, 4, 4, device=d)], one.to(d), 2, 0, [4, 4], 0,
                                     torch.empty(1, 3, 2, 2, device=d).contiguous(memory_format=torch.channels_last)))

        # compose_into's out.
        def compose_into(d, out):
            return OPS.compose_into(torch.rand(2, 4, 2, 2, device=d), torch.rand(1, 4, 4, 4, device=d),
                                    torch.zeros((1, 3), dtype=torch.long, device=d), None, None, out)

        both(lambda d: compose_into(d, torch.empty(2, 4, 8, device=d)))
        both(lambda d: compose_into(d, torch.empty(2, 3, 8, 8, device=d)))
        both(lambda d: compose_into(d, torch.empty(2, 4, 8, 8, device=d, dtype=torch.float64)))
        both(lambda d: compose_into(d, torch.empty(2, 4, 8, 8, device=d).contiguous(memory_format=torch.channels_last)))
        both(lambda d: compose_into(d, torch.empty(2, 4, 8, 6, device=d)))

        # crop_into's out.
        two = torch.zeros((2, 3), dtype=torch.long)

        def crop_into(d, out, offset=0, inputs=None):
            x = torch.rand(2, 3, 16, 16, device=d)
            return OPS.crop_into(inputs or [x], two.to(d), 4, 2, [16, 16], offset, out)

        def cl(*shape, d, dtype=torch.float32):
            return torch.empty(*shape, dtype=dtype, device=d).contiguous(memory_format=torch.channels_last)

        both(lambda d: crop_into(d, torch.empty(2, 3, 8, device=d)))
        both(lambda d: crop_into(d, cl(2, 3, 8, 8, d=d, dtype=torch.float64)))
        both(lambda d: crop_into(d, cl(3, 3, 8, 8, d=d)))
        both(lambda d: crop_into(d, cl(2, 5, 8, 8, d=d), offset=3))
        both(lambda d: crop_into(d, cl(2, 5, 8, 8, d=d), offset=-1))
        both(lambda d: crop_into(d, torch.empty(2, 5, 8, 8, device=d), offset=1))
        both(lambda d: crop_into(d, cl(2, 5, 8, 8, d=d), inputs=[torch.rand(2, 3, 16, 16, device=d),
                                                                  torch.rand(3, 3, 16, 16, device=d)]))

    @pytest.mark.parametrize("op", ["crop", "crop_into", "replace", "compose"])
    def test_out_of_range_idx_is_a_device_assertion_not_a_silent_write(self, op):
        # A device-side assertion poisons the CUDA context, so it runs in a child
        # process; it must surface as an error, never as silently wrong output.
        code = textwrap.dedent(f"""
            import torch
            import pymatting_ext
            ops = torch.ops.pymatting_ext
            bad = torch.tensor([[0, 0, 0], [0, 99, 0]], device="cuda")
            x = torch.rand(1, 2, 8, 8, device="cuda")
            p = torch.rand(2, 2, 4, 4, device="cuda")
            try:
                if "{op}" == "crop":
                    ops.crop([x], bad, 4, 0, [8, 8], [4, 4])
                elif "{op}" == "crop_into":
                    out = torch.empty(2, 3, 4, 4, device="cuda").contiguous(memory_format=torch.channels_last)
                    ops.crop_into([x], bad, 4, 0, [8, 8], 1, out)
                elif "{op}" == "replace":
                    ops.replace(x, p, bad, None)
                else:
                    ops.compose(x, p, bad, None, [8, 8], None)
                torch.cuda.synchronize()
            except RuntimeError as e:
                print("RAISED", str(e).splitlines()[0])
            else:
                print("NO ERROR")
        """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                              timeout=300)
        assert "RAISED" in proc.stdout or proc.returncode != 0, (proc.stdout, proc.stderr)
        assert "NO ERROR" not in proc.stdout, (proc.stdout, proc.stderr)
