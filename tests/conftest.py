import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Devices every parametrised test runs on; CUDA only where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


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
    return ["cpu"] if device == "cpu" else []
