"""The Triton kernels compiled over a video: warmup() compiles what an HD
frame needs (every mode, float32 and float16), the compiled variants stay
bounded frame after frame, and neither they nor torch's Triton kernel side
table grow over a video's frames. (Under the interpreter, without a GPU,
warmup compiles nothing: checked too.)"""
import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import _backend

from conftest import GPU_CASES, TRITON_CASES, needs_cuda
from helpers import random_bn_, refiner_inputs

#: The Triton backend on CUDA tensors.
GPU_TRITON_CASES = [c for c in GPU_CASES if c.values[1] == "triton"]


#: (H, W, backbone_scale, sample_pixels) of upstream's speed test.
HD = (1080, 1920, 0.25, 80_000)


def compiled_variant_counts():
    """{kernel: compiled variants}; empty under the interpreter."""
    from pymatting_ext import triton_kernels
    return triton_kernels.compiled_variants()


def _needs_compiled_triton():
    from pymatting_ext import triton_kernels
    if not triton_kernels.compiled():
        pytest.skip("the Triton kernels are interpreted here (no GPU): nothing is compiled")


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


@pytest.mark.parametrize("device,backend", GPU_TRITON_CASES)
def test_triton_caches_stay_flat_over_a_video(device, backend):
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
