"""Property-based test (hypothesis): the Refiner against upstream's
(backgroundmattingv2==1.0) with the same weights on random small inputs:
every mode, both kernel sizes, prevent_oversampling, odd coarse sizes,
sample_pixels from none to beyond the grid, thresholds outside [0, 1]. The
budget: ops/test_properties.py's (HYPOTHESIS_PROFILE)."""
import pytest
import torch

import pymatting_ext as pm

from helpers import load_hypothesis_profile, quarter_err, random_bn_, refiner_inputs

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

load_hypothesis_profile()

Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner


@settings(max_examples=25)
@given(st.data())
def test_refiner_property(data):
    mode = data.draw(st.sampled_from(["sampling", "thresholding", "full"]))
    kernel_size = data.draw(st.sampled_from([1, 3]))
    prevent = data.draw(st.booleans())
    B = data.draw(st.integers(1, 2))
    H, W = 4 * data.draw(st.integers(1, 8)), 4 * data.draw(st.integers(1, 8))
    Hc, Wc = data.draw(st.integers(1, H)), data.draw(st.integers(1, W))
    pixels = 16 * data.draw(st.integers(0, (H // 4) * (W // 4) + 2))
    if mode == "sampling" and pixels // 16 > (H // 4) * (W // 4):
        pixels = 16 * (H // 4) * (W // 4)  # upstream's topk raises beyond the grid
    threshold = data.draw(st.floats(-0.5, 1.5))
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    torch.manual_seed(seed)
    up = random_bn_(Upstream(mode, pixels, threshold, kernel_size, prevent)).eval()
    ours = pm.Refiner(mode, pixels, threshold, kernel_size, prevent).eval()
    ours.load_state_dict(up.state_dict())
    x = refiner_inputs(B, H, W, Hc, Wc)
    with torch.no_grad():
        want, got = up(*x), ours(*x)
    keep = torch.ones_like(want[0], dtype=torch.bool)
    differ = want[2] != got[2]
    if mode == "sampling" and bool(differ.any()):
        # Upstream's topk breaks ties arbitrarily (ours: the lower index):
        # the choices may differ among cells tied with the k-th largest error.
        err_q = quarter_err(x[4], H, W).view(B, -1)
        kth = err_q.topk(pixels // 16, dim=1).values[:, -1:]
        assert bool((err_q == kth)[differ.view(B, -1)].all()), "ref differs beyond a tie"
        keep = ~torch.nn.functional.interpolate(differ.float(), scale_factor=4).bool()
    else:
        assert not bool(differ.any()), "ref"
    for u, o in zip(want[:2], got[:2]):
        assert u.shape == o.shape
        assert float(((u - o).abs() * keep).max()) <= 1e-5 * max(1.0, float(u.abs().max()))
