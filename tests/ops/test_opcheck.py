"""The ops' registration: torch.library.opcheck on every C++ op on every
device (schema, fake kernel, autograd registration, AOT dispatch) and on
every Triton op (schema, fake kernel), the Triton ops registered with the C++
ops' schemas, and the ops compiled whole by torch.compile (fullgraph) on
the CPU. (The Refiner under torch.compile: refiner/test_refiner_capture.py;
the autograd registration of the backward formulas: test_autograd.py.)"""
import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import _extension, reference

from conftest import DEVICES, TRITON_CASES

OPS = torch.ops.pymatting_ext


def samples(device, dtype):
    err = torch.rand(2, 1, 10, 12, device=device, dtype=dtype)
    _, idx, valid = reference.select_sampling(err, 7, True)
    hid = torch.rand(2, 32, 5, 6, device=device, dtype=dtype)
    src = torch.rand(2, 3, 40, 48, device=device, dtype=dtype)
    patches = torch.rand(14, 4, 4, 4, device=device, dtype=dtype)
    coarse = torch.rand(2, 4, 5, 6, device=device, dtype=dtype)
    return [
        (OPS.select_sampling.default, (err, 7, True)),
        (OPS.select_sampling.default, (err, 500, False)),
        (OPS.select_thresholding.default, (err, 0.5)),
        (OPS.crop.default, ([hid, src], idx, 2, 3, [20, 24], [8, 8])),
        (OPS.crop.default, ([src], idx, 4, 2, [40, 48], [8, 8])),
        (OPS.replace.default, (torch.rand(2, 4, 40, 48, device=device, dtype=dtype), patches, idx, valid)),
        (OPS.replace.default, (torch.rand(2, 4, 40, 48, device=device, dtype=dtype), patches, idx, None)),
        (OPS.compose.default, (coarse, patches, idx, valid, [40, 48], src)),
        (OPS.compose.default, (coarse, patches, idx, None, [40, 48], None)),
        (OPS.compose_into.default, (coarse, patches, idx, valid, src,
                                    torch.zeros(2, 4, 40, 48, device=device, dtype=dtype))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    if device == "cuda" and not pm._extension.cuda_compiled():
        pytest.skip("the extension was built without CUDA sources")
    for op, args in samples(device, dtype):
        if device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"):
            continue  # no CUDA kernel for this op (yet)
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_triton_ops_are_registered_with_the_cpp_schemas(device, backend):
    for name in ("select_sampling", "select_thresholding", "crop", "crop_into", "replace", "compose", "compose_into"):
        ours = getattr(torch.ops.pymatting_ext_triton, name).default._schema
        if not _extension.available():
            continue
        cpp = getattr(torch.ops.pymatting_ext, name).default._schema
        # Same arguments and types; only the namespace (and return names) differ.
        assert [(a.name, str(a.type)) for a in ours.arguments] == [(a.name, str(a.type)) for a in cpp.arguments]
        assert [str(r.type) for r in ours.returns] == [str(r.type) for r in cpp.returns]


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_triton_opcheck(device, backend):
    ops = torch.ops.pymatting_ext_triton
    err = torch.rand(2, 1, 6, 7, device=device)
    _, idx, valid = reference.select_sampling(err, 5, True)
    hid = torch.rand(2, 3, 3, 4, device=device)
    patches = torch.rand(10, 4, 4, 4, device=device)
    coarse = torch.rand(2, 4, 3, 4, device=device)
    src = torch.rand(2, 3, 24, 28, device=device)
    cases = [
        (ops.select_sampling.default, (err, 5, True)),
        (ops.select_thresholding.default, (err, 0.5)),
        (ops.crop.default, ([hid, src], idx, 2, 3, [12, 14], [8, 8])),
        (ops.crop_into.default, ([hid, src], idx, 2, 3, [12, 14], 1,
                                 torch.zeros(idx.shape[0], 7, 8, 8, device=device).contiguous(
                                     memory_format=torch.channels_last))),
        (ops.replace.default, (torch.rand(2, 4, 24, 28, device=device), patches, idx, valid)),
        (ops.compose.default, (coarse, patches, idx, valid, [24, 28], src)),
        (ops.compose_into.default, (coarse, patches, idx, valid, src, torch.zeros(2, 4, 24, 28, device=device))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_ops_compile_fullgraph_on_cpu():
    torch._dynamo.reset()

    def pipeline(err, hid, src, coarse):
        ref, idx, valid = pm.select_sampling(err, 9, True)
        patches = pm.crop([hid, src], idx, 2, 3, (20, 24))
        out = pm.compose(coarse, patches[:, :4, 2:6, 2:6], idx, valid, (40, 48))
        return ref, out

    args = (torch.rand(2, 1, 10, 12), torch.rand(2, 32, 5, 6), torch.rand(2, 3, 40, 48), torch.rand(2, 4, 5, 6))
    eager = pipeline(*args)
    compiled = torch.compile(pipeline, fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
