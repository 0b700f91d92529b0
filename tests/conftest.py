import os

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors through Triton's
# interpreter. It must be chosen before the kernels are defined (first use of
# backend='triton').
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pymatting_ext import _backend, _extension  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Devices every parametrised test runs on; CUDA only where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def heavy_on_gpu(cases):
    """`cases` (devices, or (device, backend) pairs) with the GPU ones marked
    gpu_extra: heavy tests (Inductor compiles) whose GPU cases the GPU check
    runs last, in its optional part."""
    marked = []
    for case in cases:
        case = case if hasattr(case, "marks") else pytest.param(case)
        if "cuda" in case.values:
            case = pytest.param(*case.values, marks=[*case.marks, pytest.mark.gpu_extra], id=case.id)
        marked.append(case)
    return marked


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _backend_case(device, backend):
    marks = [needs_cuda] if device == "cuda" else []
    if backend == "cuda" and torch.cuda.is_available() and not _extension.cuda_kernels():
        # A GPU but an extension without CUDA kernels is a build failure.
        marks.append(pytest.mark.xfail(reason="extension built without CUDA kernels", strict=True))
    if backend == "triton":
        try:
            _backend.resolve("triton", torch.device(device))
        except (ValueError, RuntimeError) as exc:
            marks.append(pytest.mark.skip(reason=str(exc)))
    return pytest.param(device, backend, marks=marks, id=f"{device}-{backend}")


#: (device, backend) pairs that the op and Refiner tests run: every compiled
#: backend on every device it serves.
BACKEND_CASES = [_backend_case("cpu", "cpu"), _backend_case("cpu", "triton"),
                 _backend_case("cuda", "cuda"), _backend_case("cuda", "triton")]
#: The pairs of the Triton backend: on the CPU through its interpreter (no
#: GPU), on CUDA tensors otherwise.
TRITON_CASES = [c for c in BACKEND_CASES if c.values[1] == "triton"]
#: The pairs on CUDA tensors ('cuda' and 'triton'): the GPU-only tests at the
#: refiner's real sizes. Skipped without a GPU; 'cuda' must pass where there
#: is one (a strict xfail without the CUDA kernels), 'triton' is skipped
#: where it cannot run.
GPU_CASES = [c for c in BACKEND_CASES if c.values[0] == "cuda"]
#: The Refiner's ways on a GPU: GPU_CASES, where 'triton' runs the fused patch
#: kernel in eval mode (fused=None), and 'triton-unfused' the Triton op set
#: (fused=False).
GPU_REFINER_CASES = GPU_CASES + [pytest.param("cuda", "triton-unfused", marks=GPU_CASES[1].marks,
                                              id="cuda-triton-unfused")]
#: The marks of the tests of the CUDA kernels through torch.ops.pymatting_ext
#: on CUDA tensors (the classes TestCUDAKernels): skipped without a GPU or
#: without the CUDA half of the extension. tests/sanitize.sh runs them under
#: compute-sanitizer.
CUDA_KERNELS = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not _extension.cuda_compiled(), reason="the extension was built without CUDA kernels"),
]
#: The marks of the tests of the CPU kernels' AVX2 paths against their
#: portable loops (the classes TestCPUVector).
CPU_VECTOR = [
    pytest.mark.skipif(not _extension.available(), reason="the C++ extension is not built"),
    pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT",
                       reason="no AVX2 on this CPU: there is only the portable path"),
]


def skip_unsupported(backend, dtype):
    """Triton's kernels take float32/float16/bfloat16; ops/test_backends.py
    checks the error it gives for float64."""
    if backend == "triton" and dtype not in _backend.TRITON_DTYPES:
        pytest.skip(f"backend='triton' does not support {dtype} (it raises; see ops/test_backends.py)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    # TF32 convolutions round inputs to 10 mantissa bits; upstream and ours
    # would then differ by ~1e-4 for reasons that are not ours to test.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compiled_backends(device):
    """The compiled backends that run on `device` ('reference' excluded)."""
    return _backend.compiled_backends(torch.device(device))


#: The compiled backends that take CPU tensors here (Triton through its
#: interpreter when there is no GPU).
CPU_BACKENDS = compiled_backends("cpu")
