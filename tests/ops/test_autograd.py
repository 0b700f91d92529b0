"""The registered backward formulas of crop, replace and compose: float64
gradcheck of the C++ ops, and every compiled backend's gradients equal to the
reference's autograd on the same data (Triton through its interpreter without
a GPU)."""
import pytest
import torch

from pymatting_ext import _backend, ops, reference

from conftest import BACKEND_CASES, compiled_backends

CPU_BACKENDS = compiled_backends("cpu")


def case(device, dtype, P=9):
    """Inputs with duplicate cells, invalid rows, windows reaching outside the
    image, resampled and same-size crop inputs, and clamped epilogue values."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    B, H, W = 2, 20, 24
    idx = torch.stack([torch.randint(0, B, (P,), generator=g), torch.randint(0, H // 4, (P,), generator=g),
                       torch.randint(0, W // 4, (P,), generator=g)], 1)
    idx[1] = idx[0]
    idx[2] = torch.tensor([1, 0, W // 4 - 1])
    idx = idx.to(device)
    valid = (torch.arange(P) % 4 != 3).to(device)
    leaf = lambda t: t.detach().requires_grad_()
    return dict(
        idx=idx, valid=valid, size=(H, W),
        crop_inputs=[leaf(r(B, 3, 5, 6)), leaf(r(B, 2, H, W)), leaf(r(B, 1, H // 2, W // 2))],
        x=leaf(r(B, 4, H, W)), patches=leaf(r(P, 4, 4, 4) * 1.6 - 0.3),
        coarse=leaf(r(B, 4, 5, 6) * 1.6 - 0.3), src=leaf(r(B, 3, H, W) - 0.5))


def crop_fn(backend, c):
    return lambda *ins: ops.run_crop(backend, list(ins), c["idx"], 2, 3, (10, 12), (8, 8))


def replace_fn(backend, c):
    return lambda x, p: ops.run_replace(backend, x, p, c["idx"], c["valid"])


def compose_fn(backend, c, with_src):
    if with_src:
        return lambda a, p, s: ops.run_compose(backend, a, p, c["idx"], c["valid"], c["size"], s)
    return lambda a, p: ops.run_compose(backend, a, p, c["idx"], None, c["size"], None)


def cases(backend, c):
    return [("crop", crop_fn(backend, c), c["crop_inputs"]),
            ("replace", replace_fn(backend, c), [c["x"], c["patches"]]),
            ("compose", compose_fn(backend, c, False), [c["coarse"], c["patches"]]),
            ("compose+src", compose_fn(backend, c, True), [c["coarse"], c["patches"], c["src"]])]


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "cpu"])
def test_gradcheck_float64(backend):
    c = case("cpu", torch.float64)
    for name, fn, args in cases(backend, c):
        assert torch.autograd.gradcheck(fn, tuple(args)), name


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_equal_the_reference_autograd(device, backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("backend='triton' does not support float64")
    c = case(device, dtype)
    for (name, fn, args), (_, ref_fn, _) in zip(cases(backend, c), cases("reference", c)):
        out = fn(*args)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, args, grad)
        want = torch.autograd.grad(ref_fn(*args), args, grad)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"{name}: gradient of argument {i}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_autograd_registration(backend):
    c = case("cpu", torch.float32)
    _backend.resolve(backend, torch.device("cpu"), torch.float32)  # registers the Triton ops
    ns = torch.ops.pymatting_ext_triton if backend == "triton" else torch.ops.pymatting_ext
    samples = [
        (ns.crop.default, (c["crop_inputs"], c["idx"], 2, 3, [10, 12], [8, 8])),
        (ns.replace.default, (c["x"], c["patches"], c["idx"], c["valid"])),
        (ns.compose.default, (c["coarse"], c["patches"], c["idx"], c["valid"], [20, 24], c["src"])),
    ]
    for op, args in samples:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_select_outputs_carry_no_gradient():
    err = torch.rand(1, 1, 6, 6, requires_grad=True)
    ref, idx, valid = ops.run_select_sampling(CPU_BACKENDS[0] if CPU_BACKENDS else "reference", err, 4, True)
    assert not ref.requires_grad and not idx.requires_grad
    assert torch.equal(ref, reference.select_sampling(err.detach(), 4, True)[0])
