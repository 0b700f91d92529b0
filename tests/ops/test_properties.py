"""Property-based tests (hypothesis): every op of the CPU kernels and of the
Triton kernels (through the interpreter without a GPU) against the reference
on inputs nobody picked by hand: random shapes (1x1 grids, one row, k = 0,
k beyond the grid, empty batches), layouts, dtypes, thresholds outside
[0, 1], and NaN, infinities, signed zeros and denormals in err and in the
images. (The Refiner against upstream on random small inputs:
refiner/test_refiner_property.py.)

The budget is bounded (HYPOTHESIS_PROFILE: 'ci' by default, derandomized so
that CI is repeatable; 'dev' explores more, with fresh randomness). A
failure prints the falsifying example and the blob to reproduce it."""
import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import reference

from conftest import compiled_backends
from helpers import load_hypothesis_profile

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

load_hypothesis_profile()

BACKENDS = compiled_backends("cpu")
#: The Triton interpreter is slow: fewer examples there.
EXAMPLES = {"cpu": None, "triton": 15}

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40, 0.5, 1.0, -1.0, 2.0]
#: In the images: no infinities. A bilinear resize multiplies some taps by a
#: zero weight, and inf * 0 is NaN; which taps get a zero weight differs
#: between PyTorch's own kernels (CPU vectorised or not, CUDA), so where an
#: image holds an infinity, NaN and inf may trade places. (NaN propagates
#: alike: NaN * 0 is NaN too, and every kernel reads the same taps.)
FINITE_SPECIAL = [v for v in SPECIAL if v == v and abs(v) != float("inf")] + [float("nan")]


def budget(backend):
    n = EXAMPLES.get(backend)
    return settings(max_examples=n) if n else (lambda f: f)


def dtypes(backend):
    all_ = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    return st.sampled_from(all_ if backend != "triton" else all_[:1] + all_[2:])


@st.composite
def values(draw, shape, dtype, special=SPECIAL):
    """A tensor of `shape`: uniform noise, few distinct values (ties), or
    noise sprinkled with `special` values (by default NaN, infinities,
    signed zeros and denormals)."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["noise", "ties", "special"] if special else ["noise", "ties"]))
    t = torch.rand(shape, generator=g) * 2 - 0.5
    if kind == "ties":
        t = torch.randint(-2, 3, shape, generator=g).float() / 4
    elif kind == "special" and t.numel():
        flat = t.view(-1)
        picks = torch.randint(0, len(special), (flat.numel(),), generator=g)
        where = torch.rand(flat.numel(), generator=g) < 0.3
        flat[where] = torch.tensor(special)[picks[where]]
    return t.to(dtype)


@st.composite
def layout(draw, t):
    kind = draw(st.sampled_from(["contiguous", "channels_last", "sliced"]))
    if kind == "contiguous" or t.dim() != 4:
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(t.shape[0], t.shape[1] + 1, t.shape[2], 2 * t.shape[3], dtype=t.dtype)
    view = big[:, 1:, :, ::2]
    view.copy_(t)
    return view


def same(got, want, atol=0.0):
    """Equal, NaN where NaN; within atol elsewhere when atol > 0."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    g, w = got.double(), want.double()
    assert torch.equal(g.isnan(), w.isnan()), "NaN positions differ"
    ok = g.isnan() | (g == w)
    if atol:
        ok |= (g - w).abs() <= atol
    assert bool(ok.all()), f"max |diff| {float((g - w)[~ok].abs().max())}"


ATOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# -- selects -------------------------------------------------------------------

@st.composite
def err_maps(draw, backend):
    """(B, 1, H, W) error maps: B from 0, any layout, a dtype `backend` takes."""
    B, H, W = draw(st.integers(0, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(dtypes(backend))
    return draw(layout(draw(values((B, 1, H, W), dtype))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_sampling_property(backend):
    @budget(backend)
    @given(st.data())
    def run(data):
        err = data.draw(err_maps(backend))
        k = data.draw(st.integers(0, err.shape[2] * err.shape[3] + 3))
        prevent = data.draw(st.booleans())
        got = pm.select_sampling(err, k, prevent, backend=backend)
        want = reference.select_sampling(err.contiguous(), k, prevent)
        for g, w, name in zip(got, want, ("ref", "idx", "valid")):
            assert g.dtype == w.dtype and torch.equal(g, w), name
    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_thresholding_property(backend):
    @budget(backend)
    @given(st.data())
    def run(data):
        err = data.draw(err_maps(backend))
        threshold = data.draw(st.one_of(st.floats(-2, 3, allow_nan=False), st.sampled_from([0.0, -0.0, 1.0])))
        got = pm.select_thresholding(err, threshold, backend=backend)
        want = reference.select_thresholding(err.contiguous(), threshold)
        for g, w, name in zip(got, want, ("ref", "idx")):
            assert g.dtype == w.dtype and torch.equal(g, w), name
    run()


# -- crop, replace, compose ----------------------------------------------------

@st.composite
def cells(draw, B, h, w, max_rows=12):
    """(P, 3) idx rows inside a B x h x w grid (any order, repeats allowed)."""
    P = draw(st.integers(0, max_rows)) if B * h * w else 0
    rows = [[draw(st.integers(0, B - 1)), draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))]
            for _ in range(P)]
    return torch.tensor(rows, dtype=torch.long).view(-1, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_property(backend):
    @budget(backend)
    @given(st.data())
    def run(data):
        B = data.draw(st.integers(1, 2))
        dtype = data.draw(dtypes(backend))
        H, W = data.draw(st.integers(1, 14)), data.draw(st.integers(1, 14))
        inputs = []
        for _ in range(data.draw(st.integers(1, 3))):
            same_size = data.draw(st.booleans())
            h = H if same_size else data.draw(st.integers(1, 16))
            w = W if same_size else data.draw(st.integers(1, 16))
            c = data.draw(st.integers(0, 3))
            inputs.append(data.draw(layout(data.draw(values((B, c, h, w), dtype, FINITE_SPECIAL)))))
        stride, padding = data.draw(st.integers(1, 4)), data.draw(st.integers(0, 3))
        ph, pw = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
        idx = data.draw(cells(B, -(-H // stride), -(-W // stride)))
        got = pm.crop(inputs, idx, stride, padding, (H, W), (ph, pw), backend=backend)
        want = reference.crop([t.contiguous() for t in inputs], idx, stride, padding, (H, W), (ph, pw))
        same(got, want, ATOL[dtype])
        out = torch.full((idx.shape[0], want.shape[1] + 2, ph, pw), 7.0, dtype=dtype)
        out = out.contiguous(memory_format=torch.channels_last)
        pm.crop_into(inputs, idx, stride, padding, (H, W), 1, out, backend=backend)
        same(out[:, 1:-1], got)
        assert bool((out[:, 0] == 7).all()) and bool((out[:, -1] == 7).all())
    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_replace_and_compose_property(backend):
    @budget(backend)
    @given(st.data())
    def run(data):
        dtype = data.draw(dtypes(backend))
        B, C, s = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 4)), data.draw(st.integers(1, 4))
        H, W = s * data.draw(st.integers(1, 5)), s * data.draw(st.integers(1, 5))
        idx = data.draw(cells(B, H // s, W // s))
        P = idx.shape[0]
        patches = data.draw(layout(data.draw(values((P, C, s, s), dtype))))
        valid = None
        if data.draw(st.booleans()):
            valid = torch.tensor([data.draw(st.booleans()) for _ in range(P)], dtype=torch.bool)
        x = data.draw(layout(data.draw(values((B, C, H, W), dtype))))
        same(pm.replace(x, patches, idx, valid, backend=backend),
             reference.replace(x.contiguous(), patches, idx, valid))
        Hc, Wc = data.draw(st.integers(1, H + 2)), data.draw(st.integers(1, W + 2))
        coarse = data.draw(layout(data.draw(values((B, C, Hc, Wc), dtype, FINITE_SPECIAL))))
        src = data.draw(values((B, C - 1, H, W), dtype)) if data.draw(st.booleans()) else None
        same(pm.compose(coarse, patches, idx, valid, (H, W), src, backend=backend),
             reference.compose(coarse.contiguous(), patches, idx, valid, (H, W), src), ATOL[dtype])
    run()
