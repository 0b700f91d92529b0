"""MattingBase, MattingRefine and accelerate() against upstream's models
(backgroundmattingv2==1.0) with the same weights: every backbone, refine
mode, both kernel sizes, batch 1 and 2, float32 and float64, training mode,
state_dicts both ways, in-place acceleration of upstream models, bad input."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pymatting_ext as pm
from pymatting_ext.models import Base, MattingBase, MattingRefine, accelerate

from conftest import GPU_REFINER_CASES, needs_cuda
from helpers import quarter_err, random_bn_

upstream = pytest.importorskip("BackgroundMattingV2.model")
UpstreamRefiner = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner

OUTPUTS = ("pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm")
MODES = ["sampling", "thresholding", "full"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # NB: on a small CPU shared with other jobs, OpenMP threads spin against
    # them and these small forwards run 10-100x slower; one thread gains
    # nothing here. Upstream and ours always run under the same setting.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# -- building compared models ---------------------------------------------------

def images(B, H, W, dtype=torch.float32, device="cpu"):
    return (torch.rand(B, 3, H, W, dtype=dtype, device=device),
            torch.rand(B, 3, H, W, dtype=dtype, device=device))


def _calibrate_(conv, run, targets):
    """Rescales conv's output channels to the (mean, std) in `targets`, as
    measured over one call of run(): random weights otherwise drive the
    outputs far outside 0..1, where clamping would hide every difference,
    and saturate err at 0 and 1, where top-k ties would make upstream's
    choice of patches arbitrary."""
    seen = []
    handle = conv.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    out = torch.cat([o.transpose(0, 1).reshape(o.shape[1], -1) for o in seen], 1)
    with torch.no_grad():
        for c, (mean, std) in targets.items():
            scale = std / float(out[c].std())
            conv.weight[c] *= scale
            conv.bias[c] = (conv.bias[c] - float(out[c].mean())) * scale + mean


def upstream_refine(backbone, mode="sampling", kernel_size=3, sample_pixels=16 * 60, threshold=0.5,
                    backbone_scale=0.25, probe=(1, 64, 96), train=False, **kw):
    """Upstream's MattingRefine in eval (or training) mode with random
    weights, random BatchNorm statistics and outputs calibrated, in that
    mode, to lie mostly inside 0..1."""
    model = upstream.MattingRefine(backbone, backbone_scale, mode, sample_pixels, threshold, kernel_size, **kw)
    random_bn_(model).train(train)
    x = images(*probe)
    # Channels: pha, the foreground residual (3), err, then hid.
    _calibrate_(model.decoder.conv4, lambda: model(*x),
                {0: (0.5, 0.25), 1: (0.0, 0.2), 2: (0.0, 0.2), 3: (0.0, 0.2), 4: (0.5, 0.15)})
    _calibrate_(model.refiner.conv4, lambda: model(*x),
                {0: (0.5, 0.25), 1: (0.0, 0.2), 2: (0.0, 0.2), 3: (0.0, 0.2)})
    return model


def ours_like(up, backend="auto"):
    """Our MattingRefine with up's settings and weights."""
    r = up.refiner
    ours = MattingRefine(backbone_of(up), up.backbone_scale, r.mode, r.sample_pixels, r.threshold, r.kernel_size,
                         r.prevent_oversampling, r.patch_crop_method, r.patch_replace_method, backend=backend)
    ours.to(next(up.parameters()).dtype).load_state_dict(up.state_dict(), strict=True)
    return ours.train(up.training)


def backbone_of(model):
    if hasattr(model.backbone, "features"):
        return "mobilenetv2"
    return "resnet101" if len(model.backbone.layer3) == 23 else "resnet50"


def check_matting(want, got, exact_tol, msg="", coarse_tol=0.0):
    """All six outputs: the same shapes, dtypes and devices; the coarse
    outputs and ref_sm bit for bit (the same ops in the same order), or with
    coarse_tol the coarse outputs within it (eval inference on the CPU runs
    the coarse network as a plan of fused oneDNN convolutions, see
    pymatting_ext._coarse: float32 rounding apart) and ref_sm alike but for
    cells whose error is within coarse_tol of the selection's boundary; the
    refined pha and fgr, which go through folded BatchNorm, within exact_tol
    on every 4x4 block selected alike (they are clamped to 0..1, so an
    absolute bound is a relative one)."""
    assert len(want) == len(got) == 6
    for name, u, o in zip(OUTPUTS, want, got):
        assert (u.shape, u.dtype, u.device) == (o.shape, o.dtype, o.device), f"{msg} {name}"
    for name, u, o in zip(OUTPUTS[2:5], want[2:5], got[2:5]):
        diff = float((u - o).abs().max())
        assert diff <= coarse_tol if coarse_tol else torch.equal(u, o), f"{msg} {name}: max abs diff {diff:.3g}"
    differ = want[5] != got[5]
    if not coarse_tol:
        assert not bool(differ.any()), f"{msg} ref_sm differs"
    elif bool(differ.any()):
        H, W = want[0].shape[2:]
        err_q = quarter_err(want[4], H, W)
        for b in range(err_q.shape[0]):
            chosen, e = want[5][b].bool(), err_q[b]
            edges = [float(e[chosen].min())] if bool(chosen.any()) else []
            edges += [float(e[~chosen].max())] if bool((~chosen).any()) else []
            near = torch.zeros_like(chosen)
            for edge in edges:
                near |= (e - edge).abs() <= coarse_tol
            assert bool(near[differ[b]].all()), f"{msg} ref_sm: a cell chosen differently beyond a near-tie"
    keep = ~F.interpolate(differ.float(), size=want[0].shape[2:], mode="nearest").bool()
    for name, u, o in zip(OUTPUTS[:2], want[:2], got[:2]):
        diff = float(((u - o).abs() * keep).max())
        assert diff <= exact_tol, f"{msg} {name}: max abs diff {diff:.3g} > {exact_tol:.3g}"


def check_preconditions(up, out, x):
    """The comparison means something: refined values mostly unclamped;
    sampling and thresholding refine some blocks but not all, and sampling
    has no tie at its k-th error, where upstream's choice would be arbitrary."""
    pha, ref = out[0], out[5]
    assert float(((pha > 0) & (pha < 1)).double().mean()) > 0.5, "outputs saturated: calibration failed"
    mode = up.refiner.mode
    if mode == "full":
        return
    assert 0 < float(ref.sum()) < ref.numel(), f"{mode}: refined {float(ref.sum())} of {ref.numel()} blocks"
    if mode == "sampling":
        H, W = x[0].shape[2:]
        err_q = quarter_err(out[4], H, W).flatten(1)
        k = up.refiner.sample_pixels // 16
        top = err_q.topk(k + 1, dim=1).values
        assert bool((top[:, k - 1] > top[:, k]).all()), "tie at the k-th error"


# -- MattingRefine against upstream ----------------------------------------------

FLOAT32_TOL = 1e-5   # DESIGN.md: upstream's own fp32 error for outputs in 0..1 (seen: 9e-7)
#: The coarse outputs of the CPU plan (pymatting_ext._coarse) against the
#: modules': float32 rounding through the backbone (seen: 1.5e-6).
COARSE_TOL = 1e-5
FLOAT64_TOL = 1e-14  # folded BatchNorm moves float64 results by a few ulps (seen: 2e-15)


@pytest.fixture(scope="module")
def pairs():
    """pairs(backbone, kernel_size, dtype) -> (upstream, ours), eval mode,
    built once per module: ResNets take a while to build on a small CPU.
    Tests set the refiner's settings through configure()."""
    cache = {}

    def get(backbone, kernel_size, dtype=torch.float32):
        if (backbone, kernel_size) not in cache:
            up = upstream_refine(backbone, "sampling", kernel_size)
            ours = ours_like(up).eval()
            cache[backbone, kernel_size] = {torch.float32: (up, ours),
                                            torch.float64: (copy.deepcopy(up).double(), copy.deepcopy(ours).double())}
        return cache[backbone, kernel_size][dtype]

    yield get
    cache.clear()


def configure(models, mode, sample_pixels=16 * 60, threshold=0.5, backbone_scale=0.25):
    """What MattingRefine's constructor would have set: both models read these
    attributes in forward."""
    for m in models:
        m.backbone_scale = backbone_scale
        m.refiner.mode, m.refiner.sample_pixels, m.refiner.threshold = mode, sample_pixels, threshold
    return models


# (backbone, mode, kernel_size, B): the full cross product for the quick
# backbones, a diagonal for resnet101.
CASES = ([(b, mode, ks, B) for b in ("mobilenetv2", "resnet50") for mode in MODES for ks in (3, 1) for B in (1, 2)]
         + [("resnet101", "sampling", 3, 2), ("resnet101", "thresholding", 3, 1), ("resnet101", "full", 3, 1)])


@pytest.mark.parametrize("backbone,mode,kernel_size,B", CASES)
def test_refine_matches_upstream(pairs, backbone, mode, kernel_size, B):
    x = images(B, 64, 96)
    with torch.no_grad():
        up, ours = configure(pairs(backbone, kernel_size), mode)
        want = up(*x)
        check_preconditions(up, want, x)
        check_matting(want, ours(*x), FLOAT32_TOL, "float32", COARSE_TOL)
        up, ours = configure(pairs(backbone, kernel_size, torch.float64), mode)
        x = [t.double() for t in x]
        check_matting(up(*x), ours(*x), FLOAT64_TOL, "float64")


@pytest.mark.parametrize("mode,backbone_scale,H,W", [("sampling", 0.125, 128, 160), ("thresholding", 0.5, 64, 96),
                                                     ("sampling", 0.2, 100, 124)])
def test_refine_other_scales_and_sizes(pairs, mode, backbone_scale, H, W):
    # Coarse resolution other than H/4: err is resampled before selection.
    x = images(2, H, W)
    with torch.no_grad():
        up, ours = configure(pairs("mobilenetv2", 3), mode, backbone_scale=backbone_scale)
        want, got = up(*x), ours(*x)
    check_preconditions(up, want, x)
    check_matting(want, got, FLOAT32_TOL, coarse_tol=COARSE_TOL)
    assert got[2].shape[2:] == (int(H * backbone_scale), int(W * backbone_scale))


@pytest.mark.parametrize("mode", MODES)
def test_refine_float32_error_no_worse_than_upstreams(pairs, mode):
    x = images(2, 64, 96)
    with torch.no_grad():
        up, ours = configure(pairs("mobilenetv2", 3), mode)
        want, got = up(*x), ours(*x)
        up64, _ = configure(pairs("mobilenetv2", 3, torch.float64), mode)
        exact = up64(*[t.double() for t in x])
    for i in range(2):
        e_up = float((want[i].double() - exact[i]).abs().max())
        e_ours = float((got[i].double() - exact[i]).abs().max())
        assert e_ours <= 2 * e_up + 1e-7, (OUTPUTS[i], e_ours, e_up)


def test_refine_training_matches_upstream():
    # Batch statistics everywhere and ASPP's dropout: the same seed gives the
    # same dropout mask, as both draw the same random numbers in the same order.
    up = upstream_refine("mobilenetv2", "sampling", probe=(2, 64, 96), train=True).double()
    ours = ours_like(up)
    assert up.training and ours.training
    x = [t.double() for t in images(2, 64, 96)]
    xa = [t.clone().requires_grad_() for t in x]
    xb = [t.clone().requires_grad_() for t in x]
    torch.manual_seed(1)
    want = up(*xa)
    torch.manual_seed(1)
    got = ours(*xb)
    check_preconditions(up, [t.detach() for t in want], x)
    check_matting([t.detach() for t in want], [t.detach() for t in got], 1e-12)
    loss_up = want[0].square().sum() + want[1].square().mean() + want[3].sum()
    loss_ours = got[0].square().sum() + got[1].square().mean() + got[3].sum()
    torch.testing.assert_close(loss_ours, loss_up, rtol=1e-12, atol=0)
    loss_up.backward()
    loss_ours.backward()
    for name, a, b in zip(("src", "bgr"), xa, xb):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)
    # Gradients reach ~1e8 in the first layers; some BatchNorm biases' are
    # zero up to the cancellation of such terms: bound errors by the scale.
    scale = max(float(p.grad.abs().max()) for p in up.parameters() if p.grad is not None)
    for (name, p), q in zip(up.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-15 * scale, msg=name)
    for (name, u), o in zip(up.named_buffers(), ours.buffers()):
        torch.testing.assert_close(o, u, rtol=1e-12, atol=0, msg=name)


@needs_cuda
def test_refine_on_cuda_matches_upstream():
    up = upstream_refine("resnet50", "sampling").cuda()
    ours = ours_like(up).eval()
    x = images(2, 128, 160, device="cuda")
    with torch.no_grad():
        want, got = up(*x), ours(*x)
    assert torch.equal(want[5], got[5])
    for name, u, o in zip(OUTPUTS, want, got):
        assert (u.shape, u.dtype, u.device) == (o.shape, o.dtype, o.device), name
        assert float((u - o).abs().max()) <= FLOAT32_TOL, name


# -- MattingBase and Base against upstream ---------------------------------------

def base_from(model, cls):
    """A `cls` (MattingBase, ours or upstream's) holding the weights of
    `model` minus its refiner, loaded strictly."""
    with torch.device("meta"):
        base = cls(backbone_of(model))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("refiner.")}
    base.load_state_dict(state, strict=True, assign=True)
    return base.eval()


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50", "resnet101"])
def test_base_matches_upstream_bit_for_bit(pairs, backbone, monkeypatch):
    # Any size: MattingBase has no divisibility requirement. The modules give
    # upstream's results bit for bit; eval inference in float32 on the CPU
    # runs them as a plan of fused oneDNN convolutions (pymatting_ext._coarse),
    # float32 rounding apart.
    for dtype, B in ((torch.float32, 2), (torch.float64, 1)):
        up_refine, _ = pairs(backbone, 3, dtype)
        up, ours = base_from(up_refine, upstream.MattingBase), base_from(up_refine, MattingBase)
        # Inputs like those the weights were calibrated on: a quarter of 64x96.
        x = [F.interpolate(t, scale_factor=0.25, mode="bilinear") for t in images(B, 64, 96, dtype)]
        with torch.no_grad():
            want, planned = up(*x), ours(*x)
            monkeypatch.setenv("PYMATTING_EXT_COARSE_PLAN", "0")
            got = ours(*x)
            monkeypatch.delenv("PYMATTING_EXT_COARSE_PLAN")
        assert len(want) == len(got) == len(planned) == 4
        for name, u, o, p in zip(("pha", "fgr", "err", "hid"), want, got, planned):
            assert (u.shape, u.dtype) == (o.shape, o.dtype) == (p.shape, p.dtype), name
            assert torch.equal(u, o), f"{dtype} {name}: max abs diff {float((u - o).abs().max()):.3g}"
            tol = COARSE_TOL * max(1.0, float(u.abs().max())) if dtype == torch.float32 else 0.0
            assert float((u - p).abs().max()) <= tol, f"{dtype} {name} (plan): {float((u - p).abs().max()):.3g}"
        assert want[3].shape[1] == 32 and float(((want[0] > 0) & (want[0] < 1)).double().mean()) > 0.5


def test_generic_base_matches_upstream():
    up = random_bn_(upstream.Base("mobilenetv2", 4, 7)).eval()
    ours = Base("mobilenetv2", 4, 7)
    ours.load_state_dict(up.state_dict(), strict=True)
    ours.eval()
    x = torch.rand(2, 4, 32, 48)
    with torch.no_grad():
        want, got = up(x), ours(x)
    assert got.shape == (2, 7, 32, 48) and torch.equal(want, got)


# -- state_dicts -------------------------------------------------------------------

def shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50", "resnet101"])
def test_state_dicts_have_upstreams_keys_and_shapes(backbone):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated torchvision arguments
        for ks in (3, 1):
            assert shapes(MattingRefine(backbone, refine_kernel_size=ks)) == \
                shapes(upstream.MattingRefine(backbone, refine_kernel_size=ks))
        assert shapes(MattingBase(backbone)) == shapes(upstream.MattingBase(backbone))


@pytest.mark.parametrize("backbone", ["mobilenetv2", "resnet50"])
def test_state_dict_moves_both_ways(backbone):
    ours = random_bn_(MattingRefine(backbone, refine_kernel_size=1))
    up = upstream.MattingRefine(backbone, refine_kernel_size=1)
    up.load_state_dict(ours.state_dict(), strict=True)
    back = MattingRefine(backbone, refine_kernel_size=1)
    back.load_state_dict(up.state_dict(), strict=True)
    theirs, returned = up.state_dict(), back.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs[k], v) and torch.equal(returned[k], v), k


def test_checkpoint_of_a_base_loads_into_refine_non_strict_like_upstream():
    # Training recipe: a MattingBase checkpoint starts a MattingRefine.
    base = random_bn_(upstream.MattingBase("mobilenetv2"))
    ours, theirs = MattingRefine("mobilenetv2"), upstream.MattingRefine("mobilenetv2")
    a = ours.load_state_dict(base.state_dict(), strict=False)
    b = theirs.load_state_dict(base.state_dict(), strict=False)
    assert sorted(a.missing_keys) == sorted(b.missing_keys) and all(k.startswith("refiner.") for k in a.missing_keys)
    assert a.unexpected_keys == b.unexpected_keys == []
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in base.state_dict().items())


def test_load_pretrained_deeplabv3_state_dict_like_upstream():
    # A DeepLabV3+ checkpoint in VainF's naming, made from a random model:
    # its first conv has 3 input channels and must be skipped.
    donor = random_bn_(Base("mobilenetv2", 3, 21)).state_dict()
    deeplab = {}
    for k, v in donor.items():
        k = k.replace("aspp", "classifier.classifier.0")
        if k.startswith("backbone.features."):
            # Split at block 4, the blocks keeping their indices (as nn.Sequential slices do).
            i = int(k.split(".")[2])
            k = k.replace("backbone.features.", "backbone.low_level_features." if i < 4
                          else "backbone.high_level_features.")
        deeplab[k] = v
    deeplab["classifier.classifier.4.weight"] = torch.zeros(21, 256, 1, 1)
    ours, theirs = MattingBase("mobilenetv2"), upstream.MattingBase("mobilenetv2")
    theirs.load_state_dict(ours.state_dict())
    ours.load_pretrained_deeplabv3_state_dict(deeplab, print_stats=False)
    theirs.load_pretrained_deeplabv3_state_dict(deeplab, print_stats=False)
    got, want = ours.state_dict(), theirs.state_dict()
    taken = [k for k, v in got.items() if k in donor and torch.equal(v, donor[k])]
    assert len(taken) > 0.9 * len(got) and "backbone.features.17.conv.0.0.weight" in taken
    assert "backbone.features.0.0.weight" not in taken
    for k, v in want.items():
        assert torch.equal(got[k], v), k


# -- accelerate ----------------------------------------------------------------------

def refiner_settings(r):
    return {name: getattr(r, name) for name in ("mode", "sample_pixels", "threshold", "kernel_size",
                                                 "prevent_oversampling", "patch_crop_method",
                                                 "patch_replace_method")}


@pytest.mark.parametrize("mode,kernel_size", [("sampling", 3), ("thresholding", 1), ("full", 3)])
def test_accelerate_upstream_refine_in_place(mode, kernel_size):
    model = upstream_refine("mobilenetv2", mode, kernel_size, sample_pixels=16 * 50, threshold=0.55,
                            refine_patch_crop_method="roi_align", refine_patch_replace_method="scatter_element")
    settings = refiner_settings(model.refiner)
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    refiner, backbone = model.refiner, model.backbone
    x = images(1, 64, 96)  # batch 1: upstream's roi_align/scatter_element mix up images otherwise
    with torch.no_grad():
        want = model(*x)
    check_preconditions(model, want, x)

    out = accelerate(model, backend="reference")

    assert out is model and type(model) is MattingRefine
    assert model.refiner is refiner and type(refiner) is pm.Refiner and refiner.backend == "reference"
    assert model.backbone is backbone
    assert refiner_settings(model.refiner) == settings
    assert all(p is q for p, q in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training and not model.refiner.training
    with torch.no_grad():
        check_matting(want, model(*x), FLOAT32_TOL, coarse_tol=COARSE_TOL)


def test_accelerate_uses_the_fused_epilogue(monkeypatch):
    model = accelerate(upstream_refine("mobilenetv2", "thresholding"))
    calls = []
    real = pm.Refiner.forward_matting
    monkeypatch.setattr(pm.Refiner, "forward_matting", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(pm.Refiner, "forward", lambda *a: pytest.fail("the unfused forward ran"))
    with torch.no_grad():
        model(*images(1, 64, 96))
    assert calls == [1]


def test_accelerate_keeps_dtype_training_flag_and_optimizer():
    model = upstream_refine("mobilenetv2", "sampling").double().train()
    model.aspp.eval()  # mixed flags must survive too
    flags = {name: m.training for name, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = [t.double() for t in images(2, 64, 96)]
    torch.manual_seed(1)
    want = model(*x)
    accelerate(model)
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p.dtype == torch.float64 for p in model.parameters())
    torch.manual_seed(1)
    got = model(*x)
    check_matting([t.detach() for t in want], [t.detach() for t in got], 1e-12)
    before = model.refiner.conv1.weight.detach().clone()
    optimizer.zero_grad()
    got[0].square().mean().backward()
    optimizer.step()
    assert not torch.equal(model.refiner.conv1.weight, before), "the optimizer no longer updates the refiner"


def test_accelerate_an_upstream_refiner_in_place():
    up = random_bn_(UpstreamRefiner("thresholding", 800, 0.3, 1, False, "gather", "scatter_element")).eval()
    settings = refiner_settings(up)
    B, H, W, Hc, Wc = 1, 64, 96, 16, 24
    x = (torch.rand(B, 3, H, W), torch.rand(B, 3, H, W), torch.rand(B, 1, Hc, Wc), torch.randn(B, 3, Hc, Wc) * 0.1,
         torch.rand(B, 1, Hc, Wc), torch.rand(B, 32, Hc, Wc))
    with torch.no_grad():
        want = up(*x)
    out = accelerate(up)
    assert out is up and type(up) is pm.Refiner and up.backend == "auto"
    assert refiner_settings(up) == settings and not up.training
    with torch.no_grad():
        got = up(*x)
    assert torch.equal(want[2], got[2]) and 0 < float(got[2].sum()) < got[2].numel()
    for u, o in zip(want[:2], got[:2]):
        assert u.dtype == o.dtype and float((u - o).abs().max()) <= FLOAT32_TOL * max(1.0, float(u.abs().max()))


def test_accelerate_an_upstream_refiner_inside_a_model_of_ones_own():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.refiner = UpstreamRefiner("full", 0, 0.1)

    wrapper = Wrapper()
    accelerate(wrapper.refiner)
    assert type(wrapper.refiner) is pm.Refiner


def test_accelerate_leaves_matting_base_unchanged():
    for model in (upstream.MattingBase("mobilenetv2"), upstream.Base("mobilenetv2", 4, 2), MattingBase("mobilenetv2")):
        cls = type(model)
        assert accelerate(model) is model and type(model) is cls


def test_accelerate_our_own_models_sets_the_backend():
    ours = MattingRefine("mobilenetv2", backend="auto")
    assert accelerate(ours, backend="reference") is ours and ours.refiner.backend == "reference"
    refiner = pm.Refiner("sampling", 800, 0.1)
    assert accelerate(refiner, backend="reference") is refiner and refiner.backend == "reference"
    # An upstream model that already holds our Refiner.
    model = upstream.MattingRefine("mobilenetv2")
    model.refiner = refiner
    assert accelerate(model) is model and type(model) is MattingRefine and model.refiner is refiner
    assert refiner.backend == "auto"


def test_accelerate_rejects_other_objects():
    for thing in (nn.Conv2d(3, 3, 1), "MattingRefine", None, nn.Sequential()):
        with pytest.raises(TypeError, match="accelerate"):
            accelerate(thing)
    with pytest.raises(TypeError, match="compiled"):
        accelerate(torch.compile(upstream.MattingRefine("mobilenetv2")))


def test_accelerate_checks_before_changing_anything():
    model = upstream.MattingRefine("mobilenetv2")
    with pytest.raises(ValueError, match="backend"):
        accelerate(model, backend="gpu")
    model.refiner.extra = nn.Linear(2, 2)  # not upstream's layout
    with pytest.raises(TypeError, match="Refiner"):
        accelerate(model)
    assert type(model) is upstream.MattingRefine and type(model.refiner) is UpstreamRefiner
    del model.refiner.extra
    model.refiner.mode = "everywhere"  # invalid setting
    with pytest.raises(ValueError, match="mode"):
        accelerate(model)
    assert type(model) is upstream.MattingRefine and type(model.refiner) is UpstreamRefiner
    model.refiner.mode = "full"
    model.refiner.conv1 = nn.Conv2d(42, 24, 5, bias=False)  # shape unlike kernel_size's
    with pytest.raises(TypeError, match="conv1.weight"):
        accelerate(model)
    assert type(model) is upstream.MattingRefine and type(model.refiner) is UpstreamRefiner


# -- bad arguments and input -------------------------------------------------------

@pytest.mark.parametrize("kwargs,name", [
    (dict(backbone="resnet18"), "backbone"),
    (dict(backbone_scale=0.75), "backbone_scale"),
    (dict(backbone_scale=0), "backbone_scale"),
    (dict(refine_mode="everywhere"), "refine_mode"),
    (dict(refine_kernel_size=5), "refine_kernel_size"),
    (dict(refine_sample_pixels=-16), "refine_sample_pixels"),
    (dict(refine_sample_pixels=1.5), "refine_sample_pixels"),
    (dict(refine_threshold="high"), "refine_threshold"),
    (dict(refine_patch_crop_method="slice"), "refine_patch_crop_method"),
    (dict(refine_patch_replace_method="copy"), "refine_patch_replace_method"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_constructor_arguments(kwargs, name):
    kwargs = {"backbone": "mobilenetv2", **kwargs}
    with pytest.raises(ValueError, match=name):
        MattingRefine(**kwargs)


def test_bad_backbone_for_base():
    with pytest.raises(ValueError, match="backbone"):
        MattingBase("vgg16")
    with pytest.raises(TypeError):
        MattingRefine("mobilenetv2", 0.25, "sampling", 80_000, 0.1, 3, True, "unfold", "scatter_nd", "auto")


@pytest.fixture(scope="module")
def small_models():
    return MattingBase("mobilenetv2").eval(), MattingRefine("mobilenetv2", 0.125).eval()


@pytest.mark.parametrize("src,bgr,match", [
    (torch.rand(3, 64, 96), torch.rand(3, 64, 96), "src must be 4-D"),
    (torch.rand(1, 3, 64, 96), torch.rand(1, 4, 64, 96), "bgr must have 3"),
    (torch.rand(1, 1, 64, 96), torch.rand(1, 1, 64, 96), "src must have 3"),
    (torch.rand(1, 3, 64, 96), torch.rand(2, 3, 64, 96), "same shape"),
    (torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96, dtype=torch.float64), "same dtype"),
    (torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96, device="meta"), "same device"),
    (torch.zeros(1, 3, 64, 96, dtype=torch.uint8), torch.zeros(1, 3, 64, 96, dtype=torch.uint8), "floating"),
    (torch.rand(0, 3, 64, 96), torch.rand(0, 3, 64, 96), "empty"),
])
def test_bad_input(small_models, src, bgr, match):
    for model in small_models:
        with pytest.raises(ValueError, match=match):
            model(src, bgr)


def test_non_tensor_input(small_models):
    src = torch.rand(1, 3, 64, 96)
    for model in small_models:
        with pytest.raises(TypeError, match="bgr must be a Tensor"):
            model(src, src.numpy())


def test_bad_input_for_refine_only(small_models):
    base, refine = small_models
    odd = images(1, 62, 96)
    with pytest.raises(ValueError, match="divisible by 4"):
        refine(*odd)
    with torch.no_grad():
        assert base(*odd)[0].shape == (1, 1, 62, 96)  # as upstream: any size
    with pytest.raises(ValueError, match="backbone_scale"):
        refine(*images(1, 4, 96))  # int(4 * 0.125) == 0


def test_images_must_match_the_models_dtype_and_device(small_models):
    src = torch.rand(1, 3, 64, 96)
    for model in small_models:
        half = copy.deepcopy(model).half()
        with pytest.raises(ValueError, match=r"src and bgr are torch.float32 but the model's parameters are "
                                             r"torch.float16.*autocast"):
            half(src, src)
        with pytest.raises(ValueError, match="src and bgr are on meta but the model is on cpu"):
            model(src.to("meta"), src.to("meta"))
    # Under autocast the model casts for itself.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        copy.deepcopy(small_models[1]).bfloat16()(src, src)


def test_accelerated_model_checks_its_inputs():
    up = pytest.importorskip("BackgroundMattingV2.model").MattingRefine("mobilenetv2", 0.125).eval()
    model = accelerate(up)
    with pytest.raises(ValueError, match="floating"):
        model(torch.zeros(1, 3, 64, 96, dtype=torch.uint8), torch.zeros(1, 3, 64, 96, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same shape"):
        model(torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 100))
    with pytest.raises(ValueError, match="model's parameters are torch.float16"):
        model.half()(torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96))


def test_cuda_graph_refuses_what_it_cannot_capture():
    model = MattingRefine("mobilenetv2", 0.125).eval()
    x = torch.rand(1, 3, 64, 96)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        pm.cuda_graph(model, x, x)
    with pytest.raises(TypeError, match="must be tensors"):
        pm.cuda_graph(model, x, x.numpy())


# -- the whole model in one CUDA graph -------------------------------------------------

@pytest.mark.parametrize("device,backend", GPU_REFINER_CASES)
def test_matting_refine_as_one_cuda_graph(device, backend):
    from pymatting_ext.models import MattingRefine

    fused = False if backend == "triton-unfused" else None
    model = MattingRefine("mobilenetv2", 0.25, "sampling", 80_000, backend=backend.split("-")[0]).cuda().eval()
    model.refiner.fused = fused
    make = lambda: tuple(torch.rand(1, 3, 1080, 1920, device="cuda") for _ in range(2))
    graphed = pm.cuda_graph(model, *make())
    for _ in range(2):
        x = make()
        got = [t.clone() for t in graphed(*x)]
        with torch.inference_mode():
            want = model(*x)
        for g, w in zip(got, want):
            assert g.shape == w.shape and float((g - w).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="capture another graph"):
        graphed(*(torch.rand(1, 3, 720, 1280, device="cuda") for _ in range(2)))
