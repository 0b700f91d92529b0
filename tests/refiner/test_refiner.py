"""Refiner against upstream's Refiner (backgroundmattingv2==1.0) with the
same weights: every mode, both kernel sizes, prevent_oversampling on and off,
several resolutions and backbone scales, batch > 1, both backends, eval and
training, dtypes, and the compatibility arguments."""
import copy
import pickle
import warnings

import pytest
import torch

import pymatting_ext as pm
from pymatting_ext import _plan, reference

from conftest import DEVICES, needs_cuda
from helpers import check_outputs, quarter_err, random_bn_, refiner_inputs

Upstream = pytest.importorskip("BackgroundMattingV2.model.refiner").Refiner

MODES = ["sampling", "thresholding", "full"]
# (H, W, backbone_scale): coarse size is int(H * scale) as MattingRefine's
# interpolate(scale_factor, recompute_scale_factor=True) gives.
SIZES = [(64, 96, 0.25), (120, 164, 0.25), (96, 128, 0.125), (100, 76, 0.5), (36, 52, 0.25)]


def pair(mode, sample_pixels=2000, threshold=0.4, kernel_size=3, prevent=True, backend="auto",
         device="cpu", **kw):
    up = random_bn_(Upstream(mode, sample_pixels, threshold, kernel_size, prevent)).to(device)
    ours = pm.Refiner(mode, sample_pixels, threshold, kernel_size, prevent, backend=backend, **kw).to(device)
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, ours


def inputs(B, H, W, scale, device="cpu", dtype=torch.float32, err=None):
    return refiner_inputs(B, H, W, int(H * scale), int(W * scale), device, dtype, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("prevent", [True, False])
@pytest.mark.parametrize("H,W,scale", SIZES)
@pytest.mark.parametrize("B", [1, 2])
def test_eval_matches_upstream(device, backend, mode, kernel_size, prevent, H, W, scale, B):
    up, ours = pair(mode, 1600, 0.4, kernel_size, prevent, backend, device)
    up.eval(), ours.eval()
    x = inputs(B, H, W, scale, device)
    with torch.no_grad():
        check_outputs(up(*x), ours(*x))


@pytest.mark.parametrize("mode", MODES)
def test_eval_with_grad_enabled_matches_upstream(mode):
    # Parameters require grad and no no_grad(): the differentiable path.
    up, ours = pair(mode)
    up.eval(), ours.eval()
    x = inputs(2, 64, 96, 0.25)
    check_outputs(up(*x), ours(*x))


@pytest.mark.parametrize("mode", MODES)
def test_reference_refine_matches_upstream(mode):
    up, _ = pair(mode)
    up.eval()
    x = inputs(2, 120, 164, 0.25)
    with torch.no_grad():
        check_outputs(up(*x), reference.refine(up, *x))


@pytest.mark.parametrize("crop", ["unfold", "roi_align", "gather"])
@pytest.mark.parametrize("replace", ["scatter_nd", "scatter_element"])
def test_compatibility_methods_give_the_same_result(crop, replace):
    up, ours = pair("sampling")
    up.eval(), ours.eval()
    other = pm.Refiner("sampling", 2000, 0.4, patch_crop_method=crop, patch_replace_method=replace).eval()
    other.load_state_dict(ours.state_dict())
    x = inputs(3, 64, 96, 0.25)  # batch > 1, where upstream's gather/scatter_element mix up images
    with torch.no_grad():
        want = up(*x)
        got = other(*x)
    check_outputs(want, got)


def test_ties_follow_the_lower_index_rule():
    # Quantised error: many ties at the k-th value.
    H, W = 64, 96
    err = (torch.rand(2, 1, 16, 24) * 4).floor() / 4
    up, ours = pair("sampling", 16 * 100, prevent=True)
    up.eval(), ours.eval()
    x = inputs(2, H, W, 0.25, err=err)
    with torch.no_grad():
        a, b = up(*x), ours(*x)
    err_q = quarter_err(err, H, W)
    ref_rule, _, _ = reference.select_sampling(err_q, 100, True)
    assert torch.equal(b[2], ref_rule)
    # Where upstream and ours disagree, the cells hold the tied k-th value.
    flat = err_q.view(2, -1)
    kth = flat.topk(100, dim=1).values[:, -1]
    differ = (a[2] != b[2]).view(2, -1)
    assert bool((flat[differ] == kth[:, None].expand_as(flat)[differ]).all())
    # Outputs agree wherever both refined or both did not.
    same = (a[2] == b[2]).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert float(((a[0] - b[0]).abs() * same).max()) <= 1e-5 * max(1.0, float(a[0].abs().max()))


def test_threshold_values_exactly_at_the_threshold():
    H, W = 64, 96
    err = torch.full((1, 1, 16, 24), 0.1)
    err[0, 0, ::2] = 0.3
    up, ours = pair("thresholding", threshold=0.1)
    up.eval(), ours.eval()
    x = inputs(1, H, W, 0.25, err=err)
    with torch.no_grad():
        a, b = up(*x), ours(*x)
    check_outputs(a, b)
    assert 0 < float(b[2].sum()) < b[2].numel()


def test_more_samples_than_cells_refines_everything():
    up, ours = pair("sampling", sample_pixels=10 ** 7, prevent=False)
    ours.eval()
    x = inputs(2, 32, 48, 0.25)
    with torch.no_grad():
        pha, fgr, ref = ours(*x)
        with pytest.raises(RuntimeError):
            up.eval()(*x)  # upstream's topk cannot take more than there is
        full_k = pm.Refiner("sampling", 16 * 8 * 12, 0.1, prevent_oversampling=False).eval()
        full_k.load_state_dict(ours.state_dict())
        want = full_k(*x)
    assert bool((ref == 1).all())
    check_outputs(want, (pha, fgr, ref))


@pytest.mark.parametrize("mode", ["sampling", "thresholding"])
def test_nothing_to_refine(mode):
    up, ours = pair(mode, sample_pixels=15, threshold=2.0)
    up.eval(), ours.eval()
    x = inputs(2, 32, 48, 0.25)
    with torch.no_grad():
        a, b = up(*x), ours(*x)
    check_outputs(a, b)
    assert float(b[2].sum()) == 0


def test_zero_error_cells_are_not_refined_with_prevent_oversampling():
    err = torch.zeros(1, 1, 16, 24)
    err[0, 0, 3:5, 4:9] = torch.rand(2, 5) + 0.1
    up, ours = pair("sampling", sample_pixels=16 * 50, prevent=True)
    up.eval(), ours.eval()
    x = inputs(1, 64, 96, 0.25, err=err)
    with torch.no_grad():
        a, b = up(*x), ours(*x)
    check_outputs(a, b)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kernel_size", [3, 1])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_training_matches_upstream(mode, kernel_size, backend):
    # 'auto' runs the C++ kernels with their registered backward formulas.
    up, ours = pair(mode, kernel_size=kernel_size, backend=backend)
    up.train(), ours.train()
    x = [t.double() for t in inputs(2, 64, 96, 0.25)]
    up.double(), ours.double()
    xa = [t.clone().requires_grad_() for t in x]
    xb = [t.clone().requires_grad_() for t in x]
    a, b = up(*xa), ours(*xb)
    check_outputs(a, b, atol=1e-12)
    # A smooth loss, so that float rounding cannot flip a gradient's sign.
    (a[0].square().sum() + a[1].square().mean()).backward()
    (b[0].square().sum() + b[1].square().mean()).backward()
    for (name, p), q in zip(up.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=name)
    for name, u, o in zip(("src", "bgr", "pha", "fgr", "err", "hid"), xa, xb):
        assert (u.grad is None) == (o.grad is None), name
        if u.grad is not None:
            torch.testing.assert_close(o.grad, u.grad, rtol=1e-10, atol=1e-10, msg=name)
    for (name, u), o in zip(up.named_buffers(), ours.buffers()):
        torch.testing.assert_close(o, u, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_training_fp32_matches_upstream(mode):
    up, ours = pair(mode)
    up.train(), ours.train()
    x = inputs(2, 64, 96, 0.25)
    with torch.no_grad():
        check_outputs(up(*x), ours(*x), atol=5e-5)
    for (name, u), o in zip(up.named_buffers(), ours.buffers()):
        torch.testing.assert_close(o.float(), u.float(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("grad", [True, False])
def test_fold_cache_follows_running_stats_a_training_forward_updates(grad):
    # BatchNorm's training forward updates running_mean and running_var in
    # its kernel, without bumping their version counter: the eval calls
    # after it must not reuse the fold made before it.
    up, ours = pair("sampling", 16 * 40, prevent=False)
    x, batch = inputs(1, 64, 96, 0.25), inputs(2, 64, 96, 0.25)
    for model in (up, ours):
        model.eval()
        with torch.no_grad():
            model(*x)
        model.train()
        with torch.set_grad_enabled(grad):
            model(*batch)
        model.eval()
    with torch.no_grad():
        check_outputs(up(*x), ours(*x))


@pytest.mark.parametrize("mode", MODES)
def test_fp32_error_no_worse_than_upstreams(mode):
    up, ours = pair(mode)
    up.eval(), ours.eval()
    x = inputs(2, 120, 164, 0.25)
    with torch.no_grad():
        up64 = Upstream(mode, 2000, 0.4).eval()
        up64.load_state_dict(up.state_dict())
        exact = up64.double()(*[t.double() for t in x])
        a, b = up(*x), ours(*x)
    for i in range(2):
        e_up = float((a[i].double() - exact[i]).abs().max())
        e_ours = float((b[i].double() - exact[i]).abs().max())
        assert e_ours <= 2 * e_up + 1e-7, (i, e_ours, e_up)


@pytest.mark.parametrize("mode", MODES)
def test_float64_is_bit_exact_with_upstream(mode):
    up, ours = pair(mode)
    up.eval().double(), ours.eval().double()
    x = [t.double() for t in inputs(2, 64, 96, 0.25)]
    with torch.no_grad():
        check_outputs(up(*x), ours(*x), atol=1e-13)


@pytest.mark.parametrize("mode", ["thresholding", "full"])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_reduced_precision_close_to_upstream(mode, dtype, tol):
    # Sampling in half precision is left out: quantised errors tie, and
    # upstream breaks ties arbitrarily.
    up, ours = pair(mode)
    up.eval().to(dtype), ours.eval().to(dtype)
    x = inputs(2, 64, 96, 0.25, dtype=dtype)
    with torch.no_grad():
        a, b = up(*x), ours(*x)
    assert torch.equal(a[2], b[2]) and b[0].dtype == dtype
    for u, o in zip(a[:2], b[:2]):
        assert float((u.float() - o.float()).abs().max()) <= tol * max(1.0, float(u.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_sampling_close_to_fp32(dtype):
    # Continuous error keeps ties rare; compare with our own fp32 result.
    _, ours = pair("sampling", prevent=False)
    ours.eval()
    x = inputs(1, 64, 96, 0.25)
    with torch.no_grad():
        want = ours(*x)
        got = ours.to(dtype)(*[t.to(dtype) for t in x])
    same = (want[2] == got[2].float()).repeat_interleave(4, 2).repeat_interleave(4, 3)
    assert float(same.float().mean()) > 0.9
    for u, o in zip(want[:2], got[:2]):
        err = ((u - o.float()).abs() * same).max()
        assert float(err) <= 5e-2 * max(1.0, float(u.abs().max()))


def test_state_dict_moves_both_ways():
    up, ours = pair("sampling")
    assert list(up.state_dict()) == list(ours.state_dict())
    back = Upstream("sampling", 2000, 0.4)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in up.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_swapping_the_refiner_of_an_upstream_model():
    from BackgroundMattingV2.model import MattingRefine

    model = MattingRefine("mobilenetv2", backbone_scale=0.25, refine_mode="sampling",
                          refine_sample_pixels=3200).eval()
    random_bn_(model.refiner)
    x = (torch.rand(1, 3, 64, 96), torch.rand(1, 3, 64, 96))
    with torch.no_grad():
        want = model(*x)
        old = model.refiner
        new = pm.Refiner(old.mode, old.sample_pixels, old.threshold, old.kernel_size, old.prevent_oversampling,
                         old.patch_crop_method, old.patch_replace_method)
        new.load_state_dict(old.state_dict())
        model.refiner = new.eval()
        got = model(*x)
    for u, o in zip(want, got):
        assert u.shape == o.shape and u.dtype == o.dtype
        assert float((u - o).abs().max()) <= 1e-5


def test_sampling_eval_shapes_depend_on_k_only(monkeypatch):
    # With prevent_oversampling, invalid (zero-error) patches are computed and
    # skipped by compose: the patch count is k whatever the data, so nothing
    # waits on the device. BatchNorm is folded: its modules are not called.
    # (merge_cells plans on the host, so only on the CPU: off here, as on a GPU.)
    _, ours = pair("sampling", sample_pixels=16 * 40, prevent=True, merge_cells=False)
    ours.eval()
    err = torch.zeros(1, 1, 16, 24)
    err[0, 0, 0, :5] = 1.0
    counts = []

    def spy(real):
        def run(backend, inputs, idx, *args):
            counts.append(idx.shape[0])
            return real(backend, inputs, idx, *args)
        return run

    # Eval inference assembles conv3's input with crop_into.
    monkeypatch.setattr(pm.ops, "run_crop", spy(pm.ops.run_crop))
    monkeypatch.setattr(pm.ops, "run_crop_into", spy(pm.ops.run_crop_into))
    called = []
    handle = ours.bn1.register_forward_hook(lambda *a: called.append(1))
    try:
        with torch.no_grad():
            _, _, ref = ours(*inputs(1, 64, 96, 0.25, err=err))
    finally:
        handle.remove()
    assert float(ref.sum()) == 5
    assert sum(counts) == 2 * 40
    assert called == []


@needs_cuda
@pytest.mark.parametrize("prevent", [True, False])
def test_sampling_eval_on_cuda_never_synchronises(prevent):
    up, ours = pair("sampling", prevent=prevent, device="cuda")
    up.eval(), ours.eval()
    x = inputs(2, 120, 164, 0.25, device="cuda")
    with torch.no_grad():
        want = up(*x)
        ours(*x)  # warm-up: first calls may initialise libraries
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ours(*x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    check_outputs(want, got)


# -- the cached BatchNorm fold --------------------------------------------------

def test_eval_fold_is_cached_until_a_parameter_or_buffer_changes(monkeypatch):
    up, ours = pair("sampling", sample_pixels=16 * 40, prevent=False)
    up.eval(), ours.eval()
    folds = []
    real = pm.Refiner._fold_now
    monkeypatch.setattr(pm.Refiner, "_fold_now", lambda self: folds.append(1) or real(self))
    x = inputs(2, 64, 96, 0.25)
    with torch.no_grad():
        first = ours(*x)
        again = ours(*x)
    with torch.inference_mode():
        inferred = ours(*x)
    assert len(folds) == 1
    for a, b, c in zip(first, again, inferred):
        assert torch.equal(a, b) and torch.equal(a, c)

    # Each kind of change refolds, and the results follow upstream's.
    def changed(step):
        before = len(folds)
        step()
        with torch.no_grad():
            out = ours(*x)
            check_outputs(up(*x), out)
        assert len(folds) == before + 1, step
        with torch.no_grad():
            ours(*x)
        assert len(folds) == before + 1, step

    with torch.no_grad():
        changed(lambda: (up.bn2.running_var.mul_(2), ours.bn2.running_var.mul_(2)))  # a buffer, in place
        changed(lambda: (up.conv3.weight.add_(0.01), ours.conv3.weight.add_(0.01)))  # a parameter, in place
        changed(lambda: (up.conv4.bias.sub_(0.1), ours.conv4.bias.sub_(0.1)))
    state = random_bn_(Upstream("sampling", 16 * 40, 0.4, 3, False)).state_dict()
    changed(lambda: (up.load_state_dict(state), ours.load_state_dict(state)))
    changed(lambda: (setattr(up.bn1, "eps", 1e-3), setattr(ours.bn1, "eps", 1e-3)))
    x = tuple(t.double() for t in x)
    changed(lambda: (up.double(), ours.double()))


def test_eval_fold_keeps_autograd_where_it_is_needed(monkeypatch):
    # With grad enabled and parameters requiring grad the fold is recomputed
    # under autograd, so parameter gradients reach the convolutions; with the
    # parameters frozen the cached fold (made under inference_mode) serves
    # input gradients.
    up, ours = pair("sampling", sample_pixels=16 * 40, prevent=False)
    up.eval(), ours.eval()
    x = inputs(1, 64, 96, 0.25)
    with torch.inference_mode():
        ours(*x)
    for model in (up, ours):
        model(*x)[0].sum().backward()
    assert torch.allclose(up.conv1.weight.grad, ours.conv1.weight.grad, atol=1e-5)
    for model in (up, ours):
        model.requires_grad_(False)
    grads = []
    for model in (up, ours):
        src = x[0].clone().requires_grad_(True)
        model(src, *x[1:])[1].sum().backward()
        grads.append(src.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_eval_fold_on_sync_batchnorm(monkeypatch):
    # nn.SyncBatchNorm.convert_sync_batchnorm (upstream's training recipe)
    # puts new modules in bn1..bn3 that hold the same parameters and buffers:
    # the fold made before still applies, the BatchNorm modules are never
    # called in eval mode, and changes made through the new modules refold.
    up, ours = pair("sampling", sample_pixels=16 * 40, prevent=False)
    up.eval(), ours.eval()
    x = inputs(2, 64, 96, 0.25)
    folds, calls = [], []
    real = pm.Refiner._fold_now
    monkeypatch.setattr(pm.Refiner, "_fold_now", lambda self: folds.append(1) or real(self))
    with torch.no_grad():
        before = ours(*x)
    up, ours = (torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in (up, ours))
    for name in ("bn1", "bn2", "bn3"):
        assert type(getattr(ours, name)) is torch.nn.SyncBatchNorm
        getattr(ours, name).register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        after = ours(*x)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert len(folds) == 1 and calls == []
    with torch.no_grad():
        for m in (up, ours):
            m.bn3.running_mean.add_(0.1)
        check_outputs(up(*x), ours(*x))
    assert len(folds) == 2 and calls == []
    up.bn1.eps = ours.bn1.eps = 1e-3
    with torch.no_grad():
        check_outputs(up(*x), ours(*x))
    assert len(folds) == 3 and calls == []


# -- bounded memory: patches in chunks ------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("mode,prevent", [("sampling", True), ("sampling", False), ("thresholding", True)])
def test_patches_in_chunks_give_the_same_result(backend, mode, prevent):
    up, ours = pair(mode, 16 * 300, 0.3, prevent=prevent, backend=backend, max_patches=37)
    up.eval(), ours.eval()
    x = inputs(2, 120, 164, 0.25)
    with torch.no_grad():
        chunked = ours(*x)
        ours.max_patches = None
        whole = ours(*x)
        check_outputs(up(*x), chunked)
    assert torch.equal(chunked[2], whole[2])
    for a, b in zip(chunked[:2], whole[:2]):
        assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))


def test_default_chunk_follows_the_memory_budget(monkeypatch):
    # (Every cell is selected: merge_cells would compute them in tiles.)
    _, ours = pair("thresholding", threshold=0.0, backend="reference", merge_cells=False)
    ours.eval()
    calls = []
    real = pm.Refiner._patches

    def spy(self, backend, idx, *args):
        calls.append(idx.shape[0])
        return real(self, backend, idx, *args)

    monkeypatch.setattr(pm.Refiner, "_patches", spy)
    x = inputs(1, 64, 96, 0.25)
    with torch.no_grad():
        ours(*x)
        assert calls == [16 * 24]  # one chunk within the default budget
        calls.clear()
        ours.chunk_budget_bytes = 100 * ours._elements_per_patch * 4
        ours(*x)
    assert calls == [256, 16 * 24 - 256]  # at least 256 patches a chunk
    assert pm.Refiner.chunk_budget_bytes == 1 << 30


def test_max_patches_is_checked():
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match="max_patches must be a positive int or None"):
            pm.Refiner("sampling", 100, 0.1, max_patches=bad)


# -- reuse_output: one full-resolution output kept across calls ------------------

@pytest.mark.parametrize("mode", ["sampling", "thresholding"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_reuse_output_writes_every_call_into_one_buffer(mode, backend):
    _, fresh = pair(mode, 16 * 60, 0.4, backend=backend)
    kept = pm.Refiner(mode, 16 * 60, 0.4, backend=backend, reuse_output=True)
    kept.load_state_dict(fresh.state_dict())
    fresh.eval(), kept.eval()
    x, y = inputs(2, 64, 96, 0.25), inputs(2, 64, 96, 0.25, err=torch.rand(2, 1, 16, 24))
    with torch.no_grad():
        first = kept(*x)
        for a, b in zip(fresh(*x), first):
            assert torch.equal(a, b)
        ptr = first[0].data_ptr()
        second = kept(*y)
        for a, b in zip(fresh(*y), second):
            assert torch.equal(a, b)
        # The same buffer, so the first call's pha and fgr now hold the second's.
        assert second[0].data_ptr() == ptr and torch.equal(first[0], second[0])
        assert second[1].data_ptr() == ptr + second[0][0].numel() * second[0].element_size()
        # forward_matting and inference_mode write the same buffer.
        with torch.inference_mode():
            matting = kept.forward_matting(*x)
        assert matting[0].data_ptr() == ptr
        for a, b in zip(fresh.forward_matting(*x), matting):
            assert torch.equal(a, b)
        second = kept(*y)
        assert second[0].data_ptr() == ptr
        # Another size or dtype: a new buffer, kept in its turn.
        other = kept(*inputs(1, 64, 96, 0.25))
        assert other[0].data_ptr() != ptr
        assert kept(*inputs(1, 64, 96, 0.25))[0].data_ptr() == other[0].data_ptr()


def test_reuse_output_leaves_autograd_and_training_alone():
    up, ours = pair("sampling", 16 * 40, prevent=False, reuse_output=True)
    up.eval(), ours.eval()
    x = inputs(1, 64, 96, 0.25)
    # Grad mode with parameters requiring grad: a new output every call, and
    # the gradients of upstream.
    a, b = ours(*x), ours(*x)
    assert a[0].data_ptr() != b[0].data_ptr() and a[0].requires_grad
    for model in (up, ours):
        model(*x)[0].sum().backward()
    assert torch.allclose(up.conv1.weight.grad, ours.conv1.weight.grad, atol=1e-5)
    # Training: new outputs too.
    ours.train()
    a, b = ours(*x), ours(*x)
    assert a[0].data_ptr() != b[0].data_ptr()


def test_reuse_output_is_checked():
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="reuse_output must be True or False"):
            pm.Refiner("sampling", 100, 0.1, reuse_output=bad)


def test_reuse_output_scripts_and_compiles():
    # TorchScript and torch.compile run the same model with new outputs.
    _, ours = pair("sampling", 16 * 40, reuse_output=True)
    ours.eval()
    x = inputs(2, 64, 96, 0.25)
    with torch.no_grad():
        want = [t.clone() for t in ours(*x)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream of us
            scripted = torch.jit.script(ours)
        got = scripted(*x)
        torch._dynamo.reset()
        compiled = torch.compile(ours, fullgraph=True)(*x)
    for a, b, c in zip(want, got, compiled):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=0)


# -- without reuse_output: the last CPU output recycled where no one holds it ----

@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("grad_off", ["no_grad", "inference_mode"])
def test_unheld_cpu_output_is_rewritten_and_held_ones_never(backend, grad_off):
    _, ours = pair("sampling", 16 * 60, 0.4, backend=backend)
    fresh = pm.Refiner("sampling", 16 * 60, 0.4, backend=backend)
    fresh.load_state_dict(ours.state_dict())
    ours.eval(), fresh.eval()
    x, y = inputs(2, 64, 96, 0.25), inputs(2, 64, 96, 0.25, err=torch.rand(2, 1, 16, 24))
    off = torch.no_grad if grad_off == "no_grad" else torch.inference_mode
    with off():
        out = ours(*x)
        ptr = out[0].data_ptr()
        del out
        # Dropped: the next call writes the same memory, with its own results.
        again = ours(*y)
        assert again[0].data_ptr() == ptr
        for a, b in zip(fresh(*y), again):
            assert torch.equal(a, b)
        # Held in any form (a view, an array on it, the view's base where
        # autograd records one), kept as it is: the next call gets new memory.
        for hold in (lambda o: o[1], lambda o: o[0][:, :, 3:], lambda o: o[1].numpy(), lambda o: o[0]._base):
            del again
            again = ours(*x)
            kept = hold(again)
            if kept is None:  # (inference tensors record no base)
                continue
            want = torch.as_tensor(kept).clone()
            ptr = again[0].data_ptr()
            del again
            again = ours(*y)
            assert again[0].data_ptr() != ptr
            assert torch.equal(torch.as_tensor(kept), want)
            del kept
        # forward_matting's outputs too, and they match a fresh Refiner's.
        del again
        first = ours.forward_matting(*x)
        ptr = first[0].data_ptr()
        del first
        matting = ours.forward_matting(*y)
        assert matting[0].data_ptr() == ptr
        for a, b in zip(fresh.forward_matting(*y), matting):
            assert torch.equal(a, b)


def test_unheld_output_recycling_leaves_grad_training_modes_and_copies_alone():
    _, ours = pair("sampling", 16 * 40, prevent=False)
    ours.eval()
    x = inputs(1, 64, 96, 0.25)
    with torch.inference_mode():
        ptr = ours(*x)[0].data_ptr()
    # Out of inference mode, an inference tensor cannot be written: new memory.
    with torch.no_grad():
        out = ours(*x)
        assert not out[0].is_inference()
        ptr = out[0].data_ptr()
        del out
    # Grad mode with parameters requiring grad: new outputs with their graphs.
    a = ours(*x)
    assert a[0].requires_grad and a[0].data_ptr() != ptr
    assert not _recycled(ours)  # (nor is the last no_grad output kept alive any longer)
    ours.train()
    with torch.no_grad():
        ours(*x)
    assert not _recycled(ours)
    # The kept output lives beside the Refiner: copies and pickles never carry it.
    ours.eval()
    with torch.no_grad():
        ours(*x)
    assert _recycled(ours)
    assert not _recycled(copy.deepcopy(ours)) and not _recycled(pickle.loads(pickle.dumps(ours)))
    size = len(pickle.dumps(ours))
    _forget(ours)
    assert len(pickle.dumps(ours)) == size
    # torch.compile traces a Refiner that keeps an output: the graph neither
    # touches nor guards on the kept outputs (another Refiner's changing is
    # no cause to recompile), and returns the eager results.
    _, other = pair("sampling", 16 * 40, prevent=False)
    other.eval()
    with torch.no_grad():
        want = [t.clone() for t in ours(*x)]
        other(*x)
        assert _recycled(ours) and _recycled(other)
        torch._dynamo.reset()
        compiled = torch.compile(ours, fullgraph=True)
        got = compiled(*x)
        assert _recycled(ours)
        _forget(other)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(*x)
    for a, b, c in zip(want, got, again):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        torch.testing.assert_close(c, a, atol=1e-5, rtol=0)


def _recycled(refiner):
    return refiner in _plan._last_outputs


def _forget(refiner):
    _plan._last_outputs.pop(refiner, None)


@needs_cuda
def test_reuse_output_in_a_cuda_graph_gets_the_graphs_own_output():
    _, ours = pair("sampling", 16 * 40, device="cuda", reuse_output=True)
    ours.eval()
    x = inputs(1, 64, 96, 0.25, "cuda")
    with torch.no_grad():
        eager = [t.clone() for t in ours(*x)]
        kept = ours(*x)[0].data_ptr()
        graphed = pm.cuda_graph(ours, *x)
        replay = graphed(*x)
        assert replay[0].data_ptr() != kept
        assert ours(*x)[0].data_ptr() == kept
    for a, b in zip(eager, replay):
        assert torch.equal(a, b)
