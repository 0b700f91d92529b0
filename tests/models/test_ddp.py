"""MattingRefine trained the way upstream's train_refine.py trains it: one
process per device started by torch.multiprocessing, the model wrapped in
DistributedDataParallel, the loss of upstream's compute_loss; on the GPU also
nn.SyncBatchNorm.convert_sync_batchnorm, NCCL, float16 autocast and a
GradScaler. Ours and upstream's MattingRefine (backgroundmattingv2==1.0)
start from one state_dict, see the same data on each rank, and must end with
the same parameters.

- On the CPU (CI): 2 processes on gloo, float64, three SGD steps, to float64
  rounding; and 2 processes under float16 autocast with a GradScaler, one
  step, to AMP's rounding (the GPU test's checks, without SyncBatchNorm).
- On a GPU (tests/gpu_check.sh): NCCL, one process per GPU (2 where there
  are several, else 1), SyncBatchNorm, float16 autocast and a GradScaler, one
  step. Skipped without a GPU; its models are built and converted on the CPU
  here, and their eval fold is checked.

SyncBatchNorm trains under a process group on GPUs only: on the CPU it
raises, for upstream's model as for ours (checked). With no process group it
is plain BatchNorm, and a converted model trains as the unconverted one.

Every distributed run has deadlines (the process group's timeout and one on
the whole run, after which its processes are killed), so a deadlock fails
the test instead of hanging CI."""
import contextlib
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import pymatting_ext as pm
from pymatting_ext.models import MattingRefine, accelerate

from conftest import needs_cuda
# (_one_thread: an autouse fixture, one thread while this module's tests run.)
from test_models import COARSE_TOL, FLOAT64_TOL, _one_thread, check_matting, check_preconditions, upstream_refine  # noqa: F401,E501

upstream = pytest.importorskip("BackgroundMattingV2.model")

MODELS = {"upstream": upstream.MattingRefine, "ours": MattingRefine}
OUTPUTS = ("pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm")

#: What every run trains: the lightest backbone, kernel size 3, a batch of 2
#: images of 64 x 96 (384 cells) a rank.
BACKBONE, KERNEL_SIZE, THRESHOLD, BATCH, SIZE = "mobilenetv2", 3, 0.5, 2, (64, 96)
#: NB: at upstream's 0.25 a 64 x 96 image leaves the backbone's last stage
#: 1 x 2 pixels, whose BatchNorms' batch statistics over so few values are
#: nearly singular: float64 rounding differences of 1e-15 grew a millionfold
#: a step, to 1e-3 in the outputs after three SGD steps, whatever the
#: learning rate. At 0.5 (2 x 3 pixels) they grow about a hundredfold a step.
BACKBONE_SCALE = 0.5
#: Sampling mode, 60 cells an image: some refined, most not.
SAMPLE_PIXELS = 16 * 60
#: Every cell with a positive error. NB: under float16 autocast upstream
#: resamples the error map in float16 and ours in float32, so cells near the
#: k-th largest error may swap (see README, "Mixed precision") and the
#: refined cells, BatchNorm's batch and all gradients with them differ.
ALL_CELLS = 16 * (SIZE[0] // 4) * (SIZE[1] // 4)
#: Upstream's learning rates by part of the model (its Adam's; SGD here,
#: whose update is the gradient itself and so compares gradients).
LEARNING_RATES = {"backbone": 5e-5, "aspp": 5e-5, "decoder": 1e-4, "refiner": 3e-4}
#: NB: GradScaler's default 65536 overflows float16 in the first backward of
#: these random weights (at 2048 on the CPU, both models alike) and skips the
#: step; upstream's training skips such steps too. 32 leaves a margin of 32.
AMP_INIT_SCALE = 32.0


# -- upstream's loss ------------------------------------------------------------

def _resize(x, size):
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _sobel(x):
    """Per channel, the gradient magnitude of normalised 3 x 3 Sobel filters
    over replicated borders: kornia.sobel, which upstream's loss calls."""
    dx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    C = x.shape[1]
    kernels = torch.stack([dx, dx.t()])[:, None].repeat(C, 1, 1, 1).to(x)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=C)
    return torch.sqrt(g[:, 0::2].square() + g[:, 1::2].square() + 1e-6)


def matting_loss(pha, fgr, pha_sm, fgr_sm, err_sm, true_pha, true_fgr):
    """The terms of train_refine.py's compute_loss: L1 on alpha, its Sobel
    gradients and the foreground under the true alpha's mask, at both
    resolutions, and the squared error of the predicted error map."""
    true_pha_sm, true_fgr_sm = _resize(true_pha, pha_sm.shape[2:]), _resize(true_fgr, fgr_sm.shape[2:])
    mask, mask_sm = true_pha != 0, true_pha_sm != 0
    size = true_pha.shape[2:]
    return (F.l1_loss(pha, true_pha) + F.l1_loss(pha_sm, true_pha_sm)
            + F.l1_loss(_sobel(pha), _sobel(true_pha)) + F.l1_loss(_sobel(pha_sm), _sobel(true_pha_sm))
            + F.l1_loss(fgr * mask, true_fgr * mask) + F.l1_loss(fgr_sm * mask_sm, true_fgr_sm * mask_sm)
            + F.mse_loss(_resize(err_sm, size), _resize(pha_sm, size).sub(true_pha).abs()))


def training_batch(rank, step, dtype, device="cpu"):
    """(true_pha, true_fgr, true_src, true_bgr) for one rank and step, as
    upstream composes them: alpha with exact 0s and 1s (the loss masks)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    pha = (torch.rand(BATCH, 1, *SIZE, generator=g) * 1.6 - 0.3).clamp(0, 1)
    fgr, bgr = torch.rand(BATCH, 3, *SIZE, generator=g), torch.rand(BATCH, 3, *SIZE, generator=g)
    src = fgr * pha + bgr * (1 - pha)
    return [t.to(device, dtype) for t in (pha, fgr, src, bgr)]


# -- the models ------------------------------------------------------------------

def initial_state(dtype):
    """One state_dict for both models: upstream's MattingRefine with random
    weights and BatchNorm statistics, calibrated in training mode so that
    the outputs lie mostly in 0..1 (a clamped output has no gradient) and the
    error map has no tie at the 60th cell."""
    model = upstream_refine(BACKBONE, "sampling", KERNEL_SIZE, SAMPLE_PIXELS, THRESHOLD, BACKBONE_SCALE,
                            probe=(BATCH,) + SIZE, train=True)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def dtype_of(state):
    return state["refiner.conv1.weight"].dtype


def build(cls, state, device, sync_bn, sample_pixels=SAMPLE_PIXELS):
    """`cls` (ours or upstream's MattingRefine) holding `state`, in training
    mode on `device`, its BatchNorms converted to SyncBatchNorm if sync_bn,
    as train_refine.py builds it."""
    model = cls(BACKBONE, BACKBONE_SCALE, "sampling", sample_pixels, THRESHOLD, KERNEL_SIZE)
    model = model.to(dtype_of(state))
    model.load_state_dict(state, strict=True)
    model = model.to(device).train()
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


# -- the distributed run ------------------------------------------------------------

def _train(rank, cfg):
    """One rank: upstream's model, then ours, each wrapped in DDP over the
    process group and trained cfg['steps'] steps of SGD on this rank's
    batches (under autocast and a GradScaler where cfg['amp'] names a
    dtype); saves what the test compares."""
    torch.set_num_threads(1)
    cuda = cfg["backend"] == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        # The same convolution algorithms for both models' identical base
        # networks; no TF32 in the float32 parts (see conftest).
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dist.init_process_group(cfg["backend"], init_method="file://" + cfg["store"], rank=rank,
                            world_size=cfg["world"], timeout=datetime.timedelta(seconds=cfg["timeout"]))
    try:
        state = torch.load(cfg["state"])
        amp = cfg["amp"]
        result = {}
        for name, cls in MODELS.items():
            model = build(cls, state, device, cfg["sync_bn"], cfg["sample_pixels"])
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
            optimizer = torch.optim.SGD([{"params": getattr(model, part).parameters(), "lr": lr}
                                         for part, lr in LEARNING_RATES.items()], momentum=0.9)
            scaler = torch.amp.GradScaler(device.type, init_scale=cfg["init_scale"], enabled=amp is not None)
            steps = []
            for step in range(cfg["steps"]):
                true_pha, true_fgr, true_src, true_bgr = training_batch(rank, step, dtype_of(state), device)
                # The same dropout masks (ASPP's) for both models.
                torch.manual_seed(100 * rank + step)
                with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                    out = ddp(true_src, true_bgr)
                    loss = matting_loss(*out[:5], true_pha, true_fgr)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
                steps.append({"loss": float(loss.detach()), "scale": scaler.get_scale(),
                              "outputs": [t.detach().cpu() for t in out]})
            result[name] = {"state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "steps": steps}
        if cfg["sync_bn_checks"]:
            result["sync_bn"] = _sync_bn_checks(state, device)
        torch.save(result, os.path.join(cfg["out"], f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sync_bn_checks(state, device):
    """{model: (the message of the ValueError a SyncBatchNorm-converted model
    in training mode raises in this process group, or None; its outputs in
    eval mode, as upstream's validation step runs it)}."""
    checks = {}
    x = training_batch(dist.get_rank(), 0, dtype_of(state), device)[2:]
    for name, cls in MODELS.items():
        model = build(cls, state, device, sync_bn=True)
        try:
            model(*x)
            error = None
        except ValueError as exc:
            error = str(exc)
        with torch.no_grad():
            checks[name] = error, [t.cpu() for t in model.eval()(*x)]
    return checks


def run_distributed(tmp_path, world, deadline_s, state, **cfg):
    """Runs _train on `world` spawned processes from `state` and returns each
    rank's results. Fails the test (after killing them) if they are not done
    within deadline_s, or with the first error one of them raised."""
    torch.save(state, tmp_path / "state.pt")
    cfg.update(world=world, state=str(tmp_path / "state.pt"), store=str(tmp_path / "store"), out=str(tmp_path),
               timeout=max(10, deadline_s // 2))
    context = mp.start_processes(_train, args=(cfg,), nprocs=world, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(0.0, end - time.monotonic())):
            if time.monotonic() >= end:
                pytest.fail(f"the {world} training processes did not finish within {deadline_s} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def updates(result, state):
    """{parameter name: its final value minus its initial one}, in float64."""
    names = [name for name, _ in upstream.MattingRefine(BACKBONE).named_parameters()]
    return {k: result["state"][k].double() - state[k].double() for k in names}


def check_same_training(ranks, state, out_atol, loss_rtol, update_rtol, global_rtol, scale=1.0):
    """Upstream's run and ours, rank by rank and step by step: the same cells
    refined, outputs within out_atol (they lie in 0..1), losses within
    loss_rtol, no step skipped by a GradScaler (its scale still `scale`);
    then each parameter's update over the run within update_rtol of
    upstream's, relative to its size or, for the parameters that hardly
    move (BatchNorm biases before another BatchNorm get zero gradient up to
    rounding), to a thousandth of the whole update; the whole update within
    global_rtol. Every refiner parameter moved. DDP kept every rank's
    parameters equal."""
    for rank, result in enumerate(ranks):
        up, ours = result["upstream"], result["ours"]
        assert len(up["steps"]) == len(ours["steps"]) > 0
        for step, (a, b) in enumerate(zip(up["steps"], ours["steps"])):
            msg = f"rank {rank} step {step}"
            assert torch.equal(a["outputs"][5].float(), b["outputs"][5].float()), f"{msg}: other cells refined"
            for name, u, o in zip(OUTPUTS[:5], a["outputs"], b["outputs"]):
                assert u.shape == o.shape, f"{msg} {name}"
                diff = float((u.double() - o.double()).abs().max())
                assert diff <= out_atol, f"{msg} {name}: max abs diff {diff:.3g} > {out_atol:.3g}"
            assert abs(a["loss"] - b["loss"]) <= loss_rtol * abs(a["loss"]), (msg, a["loss"], b["loss"])
            assert a["scale"] == b["scale"] == scale, f"{msg}: a step skipped (scales {a['scale']}, {b['scale']})"
        du, do = updates(up, state), updates(ours, state)
        whole_up, whole_ours = (torch.cat([d.flatten() for d in u.values()]) for u in (du, do))
        total, diff = float(whole_up.norm()), float((whole_ours - whole_up).norm())
        assert diff <= global_rtol * total, f"rank {rank}: |ours - upstream| {diff:.3g}, upstream's update {total:.3g}"
        for name in du:
            size, diff = float(du[name].norm()), float((do[name] - du[name]).norm())
            assert diff <= update_rtol * max(size, 1e-3 * total), \
                f"rank {rank} {name}: |ours - upstream| {diff:.3g}, upstream's update {size:.3g} of {total:.3g}"
            if name.startswith("refiner."):
                assert size > 1e-6 * total, f"rank {rank} {name}: not updated"
    for name in updates(ranks[0]["upstream"], state):
        for model in MODELS:
            assert torch.equal(ranks[0][model]["state"][name], ranks[-1][model]["state"][name]), (model, name)


# -- CPU: gloo -----------------------------------------------------------------------

def test_ddp_on_gloo_matches_upstream_float64(tmp_path):
    state = initial_state(torch.float64)
    ranks = run_distributed(tmp_path, 2, 240, state, backend="gloo", amp=None, sync_bn=False, sync_bn_checks=True,
                            sample_pixels=SAMPLE_PIXELS, steps=3, init_scale=1.0)
    probe = build(upstream.MattingRefine, state, "cpu", False)
    for rank, result in enumerate(ranks):
        x = training_batch(rank, 0, torch.float64)[2:]
        check_preconditions(probe, result["upstream"]["steps"][0]["outputs"], x)
    # NB: these random weights amplify rounding ~100x a step: upstream run
    # from weights perturbed by one ulp differs from itself by 1e-12 in its
    # outputs after the first step and 2e-8 after the third. Ours differs
    # from upstream by 1.6e-10 after the third (loss 1.3e-12 relative), its
    # updates by 5.4e-10 (per parameter, relative) and 3.9e-10 (all
    # parameters), its buffers by 1.1e-11 (relative to their largest value).
    check_same_training(ranks, state, out_atol=2e-9, loss_rtol=1e-10, update_rtol=1e-8, global_rtol=1e-8)
    for result in ranks:
        up, ours = result["upstream"]["state"], result["ours"]["state"]
        assert up.keys() == ours.keys()
        for name, value in up.items():
            diff = float((ours[name].double() - value.double()).abs().max())
            assert diff <= 1e-9 * float(value.double().abs().max()), f"{name}: max abs diff {diff:.3g}"
    # SyncBatchNorm under a process group trains on GPUs only: on the CPU it
    # raises, for upstream's model as for ours. In eval mode (upstream's
    # validation) it is plain BatchNorm, and ours folds it.
    for result in ranks:
        (up_error, up_out), (ours_error, ours_out) = result["sync_bn"]["upstream"], result["sync_bn"]["ours"]
        assert up_error and "SyncBatchNorm expected input tensor to be on GPU" in up_error
        assert ours_error == up_error
        check_matting(up_out, ours_out, FLOAT64_TOL)


#: AMP's bounds for one step. NB: these random weights are ill-conditioned
#: under float16 (upstream's gradients under autocast differ from its float32
#: ones by 130%), but both models run the same base network in the same
#: float16 operations: they differ only where upstream's refiner works in
#: float16 and ours in float32 (its output pha is float16, ours float32).
#: Measured on the CPU (float16 autocast, 2 ranks): outputs 1.2e-3, loss 2.6e-6
#: (relative), updates 4.8e-2 per parameter and 1.0e-2 in all, relative.
AMP_TOLERANCES = {"out_atol": 5e-3, "loss_rtol": 1e-4, "update_rtol": 0.25, "global_rtol": 0.05}


def test_ddp_on_gloo_with_amp_matches_upstream(tmp_path):
    # The GPU test's run without SyncBatchNorm: float16 autocast, GradScaler.
    state = initial_state(torch.float32)
    ranks = run_distributed(tmp_path, 2, 240, state, backend="gloo", amp=torch.float16, sync_bn=False,
                            sync_bn_checks=False, sample_pixels=ALL_CELLS, steps=1, init_scale=AMP_INIT_SCALE)
    check_same_training(ranks, state, scale=AMP_INIT_SCALE, **AMP_TOLERANCES)


# -- SyncBatchNorm without a process group -------------------------------------------------

def converted_pair(state):
    """Upstream's model and ours built as the GPU test builds them, on the
    CPU: every BatchNorm converted to SyncBatchNorm, the weights unchanged."""
    models = [build(cls, state, "cpu", True) for cls in MODELS.values()]
    plain = build(upstream.MattingRefine, state, "cpu", False)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    for model in models:
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert sum(type(m) is nn.SyncBatchNorm for m in model.modules()) == n_bn > 3
        assert all(type(getattr(model.refiner, bn)) is nn.SyncBatchNorm for bn in ("bn1", "bn2", "bn3"))
        got = model.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    return models


def test_sync_batchnorm_models_fold_in_eval_mode(monkeypatch):
    # Outside a process group SyncBatchNorm in eval mode is plain
    # batch_norm: upstream's converted model gives its unconverted results,
    # and ours folds the converted BatchNorms into the convolutions (never
    # calling them) to the same results as unconverted.
    state = initial_state(torch.float32)
    up, ours = (m.eval() for m in converted_pair(state))
    up_plain = build(upstream.MattingRefine, state, "cpu", False).eval()
    ours_plain = build(MattingRefine, state, "cpu", False).eval()
    x = training_batch(0, 0, torch.float32)[2:]
    folds, calls = [], []
    real = pm.Refiner._fold_now
    monkeypatch.setattr(pm.Refiner, "_fold_now", lambda self: folds.append(1) or real(self))
    for bn in ("bn1", "bn2", "bn3"):
        getattr(ours.refiner, bn).register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        want, plain = up(*x), up_plain(*x)
        got, again, got_plain = ours(*x), ours(*x), ours_plain(*x)
    for name, a, b in zip(OUTPUTS, want, plain):
        assert torch.equal(a, b), f"upstream's SyncBatchNorm in eval mode: {name}"
    check_preconditions(up, want, x)
    check_matting(want, got, 1e-5, coarse_tol=COARSE_TOL)
    for name, a, b, c in zip(OUTPUTS, got, again, got_plain):
        assert torch.equal(a, b) and torch.equal(a, c), name
    assert calls == [] and len(folds) == 2  # the converted model's fold once, the plain one's once
    # A changed statistic refolds.
    with torch.no_grad():
        for model in (up, ours):
            model.refiner.bn2.running_var.mul_(1.5)
        check_matting(up(*x), ours(*x), 1e-5, coarse_tol=COARSE_TOL)
    assert calls == [] and len(folds) == 3
    # accelerate() takes an upstream model converted before it.
    with torch.no_grad():
        want = up(*x)
        check_matting(want, accelerate(up)(*x), 1e-5, coarse_tol=COARSE_TOL)
    assert type(up) is MattingRefine and type(up.refiner.bn1) is nn.SyncBatchNorm and len(folds) == 4


def test_sync_batchnorm_models_train_without_a_process_group():
    # No process group: SyncBatchNorm trains as BatchNorm (batch statistics
    # over the refined patches), on the CPU too; ours as upstream's.
    state = initial_state(torch.float64)
    up, ours = converted_pair(state)
    plain = build(MattingRefine, state, "cpu", False)
    true_pha, true_fgr, src, bgr = training_batch(0, 0, torch.float64)
    outs = []
    for model in (up, ours, plain):
        torch.manual_seed(1)
        out = model(src, bgr)
        matting_loss(*out[:5], true_pha, true_fgr).backward()
        outs.append([t.detach() for t in out])
    check_preconditions(up, outs[0], (src, bgr))
    check_matting(outs[0], outs[1], 1e-12)
    for name, a, b in zip(OUTPUTS, outs[1], outs[2]):
        assert torch.equal(a, b), name
    scale = max(float(p.grad.abs().max()) for p in up.parameters())
    for (name, p), q, r in zip(up.named_parameters(), ours.parameters(), plain.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-13 * scale, msg=name)
        assert torch.equal(q.grad, r.grad), name
    for (name, u), o in zip(up.named_buffers(), ours.buffers()):
        torch.testing.assert_close(o, u, rtol=1e-12, atol=0, msg=name)


# -- GPU: NCCL, SyncBatchNorm, AMP -----------------------------------------------------

@needs_cuda
@pytest.mark.skipif(not dist.is_nccl_available(), reason="needs NCCL")
def test_ddp_on_nccl_with_sync_batchnorm_and_amp_matches_upstream(tmp_path):
    # One process per GPU, as train_refine.py: 2 where there are several, 1
    # on a one-GPU machine (SyncBatchNorm then normalises by itself).
    world = min(2, torch.cuda.device_count())
    state = initial_state(torch.float32)
    # (A deadline inside the GPU check's per-test --timeout of 120 s.)
    ranks = run_distributed(tmp_path, world, 100, state, backend="nccl", amp=torch.float16, sync_bn=True,
                            sync_bn_checks=False, sample_pixels=ALL_CELLS, steps=1, init_scale=AMP_INIT_SCALE)
    check_same_training(ranks, state, scale=AMP_INIT_SCALE, **AMP_TOLERANCES)
