"""Shared test helpers."""
import torch
import torch.nn.functional as F


def random_bn_(module):
    """Random BatchNorm statistics and affine parameters, so that folding and
    batch statistics are actually exercised."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module


def refiner_inputs(B, H, W, Hc, Wc, device="cpu", dtype=torch.float32, err=None):
    """src, bgr, pha, fgr, err, hid as MattingRefine would hand them over."""
    g = lambda *s: torch.rand(*s, device=device, dtype=torch.float32)
    src, bgr = g(B, 3, H, W), g(B, 3, H, W)
    pha = g(B, 1, Hc, Wc)
    fgr = (torch.randn(B, 3, Hc, Wc, device=device) * 0.1)
    err = g(B, 1, Hc, Wc) if err is None else err.to(device)
    hid = g(B, 32, Hc, Wc)
    return tuple(t.to(dtype) for t in (src, bgr, pha, fgr, err, hid))


def quarter_err(err, H, W):
    return F.interpolate(err, (H // 4, W // 4), mode="bilinear", align_corners=False)


def assert_close(actual, expected, atol, rtol=0.0, msg=""):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    nan_same = torch.isnan(actual.double()) == torch.isnan(expected.double())
    assert bool(nan_same.all()), f"{msg}: NaN positions differ"
    bad = (diff > bound) & ~torch.isnan(diff)
    assert not bool(bad.any()), f"{msg}: max abs diff {diff[~torch.isnan(diff)].max().item():.3g} > atol {atol}"
