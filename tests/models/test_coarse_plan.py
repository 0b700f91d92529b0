"""The coarse network's CPU plan (pymatting_ext._coarse): oneDNN convolutions
with BatchNorm folded, packed weights, channels-last activations and fused
post-ops. Against the modules and upstream's MattingBase within float32
rounding, every backbone, batch > 1, odd sizes; bfloat16 autocast within
its documented accuracy; used only where it may be (eval inference on the
CPU), rebuilt when the weights change, never stored in the model."""
import copy
import io
import os
import pickle

import pytest
import torch
from torch import nn

import pymatting_ext as pm
from pymatting_ext import _coarse
from pymatting_ext.models import MattingBase, MattingRefine, accelerate

from helpers import random_bn_
from test_models import _one_thread  # noqa: F401 (one thread, as the other model tests)

upstream = pytest.importorskip("BackgroundMattingV2.model")

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
needs_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="this CPU has no native bfloat16")

BACKBONES = ["mobilenetv2", "resnet50", "resnet101"]


def modules_only():
    """A context in which the models run their modules, as upstream's."""
    class Off:
        def __enter__(self):
            os.environ[_coarse.ENV_VAR] = "0"

        def __exit__(self, *exc):
            del os.environ[_coarse.ENV_VAR]
    return Off()


def base_pair(backbone):
    torch.manual_seed(0)
    up = random_bn_(upstream.MattingBase(backbone)).eval()
    ours = MattingBase(backbone).eval()
    ours.load_state_dict(up.state_dict())
    return up, ours


def images(B, H, W):
    g = torch.Generator().manual_seed(B * H + W)
    return torch.rand(B, 3, H, W, generator=g), torch.rand(B, 3, H, W, generator=g)


def assert_close(got, want, atol, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    diff = float((got.float() - want.float()).abs().max())
    scale = max(1.0, float(want.abs().max()))
    assert diff <= atol * scale, f"{what}: max |diff| {diff:.3g} > {atol * scale:.3g}"


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("B,H,W", [(1, 64, 96), (2, 50, 74)])
def test_plan_matches_upstream_within_float32_rounding(backbone, B, H, W):
    up, ours = base_pair(backbone)
    x = images(B, H, W)
    x6 = torch.cat(x, 1)
    with torch.no_grad():
        assert _coarse.coarse_plan(ours, x6) is not None
        got = ours._coarse_net(x6)
        with modules_only():
            exact = ours._coarse_net(x6)
            assert all(torch.equal(u, o) for u, o in zip(up(*x), ours(*x))), "the modules are upstream's"
    assert not torch.equal(got, exact), "the plan ran (results differ by rounding)"
    # The decoder's output (before the models' clamps), relative to its
    # magnitude: folded BatchNorm and another order of the sums, float32
    # rounding through 20-100 layers (measured 1e-6 to 4e-6).
    assert got.shape == exact.shape and got.dtype == exact.dtype and got.is_contiguous()
    rel = float((got - exact).abs().max() / exact.abs().max())
    assert rel < 2e-5, f"max |diff| / max |x| = {rel:.3g}"


def test_plan_uses_upstreams_own_submodules_after_accelerate():
    torch.manual_seed(0)
    up = random_bn_(upstream.MattingRefine("mobilenetv2", 0.25, "sampling", 16 * 60)).eval()
    want_model = copy.deepcopy(up)
    model = accelerate(up)
    x = images(1, 64, 96)
    with torch.no_grad():
        assert type(model.backbone).__module__.startswith("BackgroundMattingV2")
        assert _coarse.coarse_plan(model, torch.rand(1, 6, 16, 24)) is not None
        want, got = want_model(*x), model(*x)
    for name, u, o in zip(("pha_sm", "fgr_sm", "err_sm"), want[2:5], got[2:5]):
        assert_close(o, u, 2e-5, name)


def test_plan_is_cached_and_rebuilt_when_the_weights_change():
    up, ours = base_pair("mobilenetv2")
    x = torch.rand(1, 6, 16, 24)
    with torch.no_grad():
        first = _coarse.coarse_plan(ours, x)
        assert _coarse.coarse_plan(ours, x) is first
        # One plan per input size (oneDNN packs the weights for it), the last.
        other = _coarse.coarse_plan(ours, torch.rand(2, 6, 20, 28))
        assert other is not first and _coarse.coarse_plan(ours, torch.rand(2, 6, 20, 28)) is other
        first = _coarse.coarse_plan(ours, x)
        ours.decoder.conv4.bias.add_(1.0)  # in place
        second = _coarse.coarse_plan(ours, x)
        assert second is not first
        ours.load_state_dict(up.state_dict())
        third = _coarse.coarse_plan(ours, x)
        assert third is not second
        ours.aspp.project[1].eps = 1e-3
        assert _coarse.coarse_plan(ours, x) is not third
        ours.aspp.project[1].eps = 1e-5
        # The rebuilt plan computes with the new weights.
        src, bgr = images(1, 64, 96)
        want = up(src, bgr)
        assert_close(ours(src, bgr)[2], want[2], 2e-5, "err after load_state_dict")


def test_plan_is_rebuilt_after_a_training_forward_updates_the_running_stats():
    # BatchNorm updates running_mean and running_var without bumping their
    # version counter; its num_batches_tracked (in the key) tells.
    up, ours = base_pair("mobilenetv2")
    x = images(1, 64, 96)
    for model in (up, ours):
        with torch.no_grad():
            model(*x)
            model.train()
            torch.manual_seed(1)  # (the ASPP's Dropout, before the decoder's BatchNorms)
            model(*images(2, 64, 96))
        model.eval()
    with torch.no_grad():
        for name, u, o in zip(("pha", "fgr", "err"), up(*x), ours(*x)):
            assert_close(o, u, 2e-5, name)


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
def test_plan_holds_one_packed_copy_of_the_weights(backbone):
    # What the plan costs in memory beside the model (the benchmark's
    # breakdown of peak memory): its packed weights, packed on the first call.
    _, ours = base_pair(backbone)
    x = torch.rand(1, 6, 64, 96)
    params = sum(p.numel() * p.element_size() for part in (ours.backbone, ours.aspp, ours.decoder)
                 for p in part.parameters())
    with torch.no_grad():
        plan = _coarse.coarse_plan(ours, x)
        assert plan.nbytes() == 0
        ours._coarse_net(x)
    # oneDNN pads the blocked layouts (the stem's 6 input channels to 8, the
    # decoder's 37 outputs to 48) and drops the BatchNorms' parameters.
    assert params * 0.98 < plan.nbytes() < params * 1.05


@pytest.mark.parametrize("how", ["training", "grad", "hook", "float64", "env", "autocast fp16", "tracing"])
def test_modules_run_where_the_plan_may_not(how):
    _, ours = base_pair("mobilenetv2")
    x = torch.rand(1, 6, 16, 24)
    if how == "training":
        ours.train()
        assert _coarse.coarse_plan(ours, x) is None
    elif how == "grad":
        assert _coarse.coarse_plan(ours, x) is None  # parameters require grad, grad mode on
        with torch.no_grad():
            assert _coarse.coarse_plan(ours, x) is not None
    elif how == "hook":
        handle = ours.backbone.features[3].register_forward_hook(lambda *a: None)
        with torch.no_grad():
            assert _coarse.coarse_plan(ours, x) is None
        handle.remove()
        with torch.no_grad():
            assert _coarse.coarse_plan(ours, x) is not None
    elif how == "float64":
        ours.double()
        with torch.no_grad():
            assert _coarse.coarse_plan(ours, x.double()) is None
    elif how == "env":
        with torch.no_grad(), modules_only():
            assert _coarse.coarse_plan(ours, x) is None
    elif how == "autocast fp16":
        with torch.no_grad(), torch.autocast("cpu", torch.float16):
            assert _coarse.coarse_plan(ours, x) is None
    elif how == "tracing":
        seen = []
        real = _coarse.CoarsePlan.__call__
        try:
            _coarse.CoarsePlan.__call__ = lambda self, x: seen.append(1) or real(self, x)
            with torch.no_grad():
                torch.jit.trace(ours, images(1, 64, 96), check_trace=False)
        finally:
            _coarse.CoarsePlan.__call__ = real
        assert not seen, "traced models must record the modules"


def test_training_and_gradients_are_upstreams():
    up, ours = base_pair("mobilenetv2")
    x = images(2, 64, 96)
    for model in (up, ours):
        model.train()
    torch.manual_seed(1)  # (the ASPP's Dropout)
    want = up(*x)
    torch.manual_seed(1)
    got = ours(*x)
    for u, o in zip(want, got):
        assert torch.equal(u, o)
    sum(t.sum() for t in want).backward()
    sum(t.sum() for t in got).backward()
    for (name, p), q in zip(up.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_models_with_a_plan_copy_pickle_and_script():
    _, ours = base_pair("mobilenetv2")
    x = images(1, 64, 96)
    with torch.no_grad():
        want = ours(*x)
    assert not any(isinstance(v, _coarse.CoarsePlan) for v in vars(ours).values())
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        with torch.no_grad():
            for u, o in zip(want, clone(*x)):
                assert torch.equal(u, o)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    assert set(torch.load(io.BytesIO(buffer.getvalue()))) == set(ours.state_dict())
    scripted = torch.jit.script(ours)
    with torch.no_grad(), modules_only():
        exact = ours(*x)
    with torch.no_grad():
        for u, o in zip(exact, scripted(*x)):
            assert torch.equal(u, o)  # TorchScript runs the modules


def test_unknown_layouts_run_the_modules():
    _, ours = base_pair("mobilenetv2")
    ours.decoder.relu = nn.GELU()
    x = torch.rand(1, 6, 16, 24)
    with torch.no_grad():
        assert _coarse.coarse_plan(ours, x) is None
        ours(*images(1, 64, 96))


@needs_bf16
@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
def test_bfloat16_autocast_runs_the_plan_within_its_accuracy(backbone):
    # The accuracy the README gives for bfloat16 on the CPU: mean |diff| of
    # the coarse outputs against fp32 below 0.01 (measured 0.001-0.0035 on
    # calibrated random weights), as upstream's own autocast.
    up, ours = base_pair(backbone)
    x = images(2, 64, 96)
    with torch.no_grad():
        want = up(*x)
        with torch.autocast("cpu", torch.bfloat16):
            assert _coarse.coarse_plan(ours, torch.cat(x, 1)).dtype == torch.bfloat16
            got = ours(*x)
            theirs = up(*x)
    for name, u, o, t in zip(("pha", "fgr", "err"), want, got, theirs):
        assert o.dtype == t.dtype, name
        ours_err = float((o.float() - u).abs().mean())
        their_err = float((t.float() - u).abs().mean())
        assert ours_err < 0.01, f"{name}: mean |diff| {ours_err:.3g}"
        assert ours_err < 2 * their_err + 1e-3, f"{name}: {ours_err:.3g} against upstream's own {their_err:.3g}"


@needs_bf16
def test_bfloat16_model_runs_the_plan():
    _, ours = base_pair("mobilenetv2")
    ours.bfloat16()
    x = [t.bfloat16() for t in images(1, 64, 96)]
    with torch.no_grad():
        assert _coarse.coarse_plan(ours, torch.cat(x, 1)).dtype == torch.bfloat16
        got = ours(*x)
        with modules_only():
            want = ours(*x)
    for u, o in zip(want, got):
        assert o.dtype == torch.bfloat16
        assert float((o.float() - u.float()).abs().mean()) < 0.01


def test_matting_refine_default_path_uses_the_plan(monkeypatch):
    model = MattingRefine("mobilenetv2", 0.25, "sampling", 16 * 60).eval()
    calls = []
    real = _coarse.CoarsePlan._run
    monkeypatch.setattr(_coarse.CoarsePlan, "_run", lambda self, x: calls.append(1) or real(self, x))
    with torch.inference_mode():
        model(*images(1, 64, 96))
    assert calls == [1]
    assert pm.MattingRefine is MattingRefine


@pytest.mark.parametrize("B", [1, 2])
def test_refiner_reads_hid_channels_last_with_the_same_results(B):
    # MattingRefine hands the refiner hid as a view of the plan's
    # channels-last output (no NCHW copy); pha, fgr and err come from an
    # NCHW copy, so the coarse outputs it returns have upstream's strides.
    model = random_bn_(MattingRefine("mobilenetv2", 0.5, "sampling", 16 * 40)).eval()
    x = images(B, 64, 96)
    x_sm = [torch.nn.functional.interpolate(t, scale_factor=0.5, mode="bilinear") for t in x]
    with torch.inference_mode():
        pha, fgr_residual, err, hid = model._coarse(*x_sm, True)
        want = model._coarse(*x_sm)
        assert hid.stride()[1] == 1, "hid is a view of the channels-last output"
        for name, u, o in zip(("pha", "fgr residual", "err", "hid"), want, (pha, fgr_residual, err, hid)):
            assert torch.equal(u, o), name
        got = model(*x)
        real = type(model)._coarse
        model._coarse = lambda s, b, any_hid_layout=False: real(model, s, b, False)
        exact = model(*x)
    for name, u, o in zip(("pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm"), exact, got):
        assert torch.equal(u, o), name
        # (The batch stride of the coarse outputs is 5 channels' instead of 37.)
        assert u.stride()[1:] == o.stride()[1:] and u.is_contiguous() == o.is_contiguous(), name
