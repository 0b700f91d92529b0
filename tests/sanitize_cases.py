"""A short run of every GPU op for compute-sanitizer (tests/gpu_check.sh):
small odd shapes, every dtype, both GPU backends, each result checked against
the CPU kernels or the reference, so that a sanitizer's report and a wrong
result both fail the run.

    python sanitize_cases.py ops|select [backend ...]   (default: cuda triton)

'ops' runs crop, crop_into, replace and compose; 'select' the two select ops
at a refiner size. Exit status 1 on a wrong result. Backend 'cpu' runs the same cases on the CPU
kernels (a rehearsal without a GPU). Sanitizers slow every
launch a hundredfold: the cases are few and small on purpose; the op tests
cover the rest."""
import sys

import torch

import pymatting_ext as pm
from pymatting_ext import _backend, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
failures = []


def check(name, got, want, atol=0.0):
    got, want = got.cpu(), want.cpu()
    ok = got.shape == want.shape and got.dtype == want.dtype
    if ok:
        ok = torch.equal(got, want) if atol == 0 else bool(
            ((got.double() - want.double()).abs() <= atol).all())
    if not ok:
        failures.append(name)
        print(f"WRONG {name}", flush=True)


def device_of(backend):
    return torch.device("cpu" if backend == "cpu" else "cuda")


def runnable(backend, dtype):
    try:
        _backend.resolve(backend, device_of(backend), dtype)
        return True
    except (ValueError, RuntimeError):
        return False


def ops_cases(backend):
    for dtype in DTYPES:
        if not runnable(backend, dtype):
            continue
        g = lambda *s: torch.rand(*s).to(dtype)
        B, H, W = 2, 44, 60
        hid, pha, src = g(B, 5, 11, 15), g(B, 1, 11, 15), g(B, 3, H, W)
        sliced = g(B, 4, H, 2 * W)[:, 1:3, :, ::2]
        err = torch.rand(B, 1, H // 4, W // 4)
        _, idx, valid = reference.select_sampling(err, 37, True)
        idx = torch.cat([idx, torch.tensor([[0, 0, 0], [B - 1, H // 4 - 1, W // 4 - 1]])])
        valid = torch.cat([valid, torch.tensor([True, False])])
        tag = f"{backend} {dtype}"
        inputs = [hid, pha, src, sliced]
        dev = device_of(backend)
        cu = lambda ts: [t.to(dev) for t in ts]
        for stride, padding, size in ((2, 3, (H // 2, W // 2)), (4, 2, (H, W)), (1, 3, (H, W))):
            rows = idx if stride != 1 else torch.tensor([[0, 0, 0], [1, 0, 0]])
            ph, pw = (stride + 2 * padding,) * 2 if stride != 1 else (H + 6, W + 6)
            got = pm.ops.run_crop(backend, cu(inputs), rows.to(dev), stride, padding, size, (ph, pw))
            want = reference.crop(inputs, rows, stride, padding, size, (ph, pw))
            check(f"crop {tag} stride {stride}", got, want, TOL[dtype])
            out = torch.full((rows.shape[0], 13, ph, pw), float("nan"), dtype=dtype, device=dev)
            out = out.contiguous(memory_format=torch.channels_last)
            pm.ops.run_crop_into(backend, cu(inputs[2:]), rows.to(dev), stride, padding, size, 3, out)
            check(f"crop_into {tag} stride {stride}", out[:, 3:8],
                  reference.crop(inputs[2:], rows, stride, padding, size, (ph, pw)), TOL[dtype])
            if not (bool(out[:, :3].isnan().all()) and bool(out[:, 8:].isnan().all())):
                failures.append(f"crop_into {tag} stride {stride}: wrote outside its channels")
        for s in (4, 2):
            P = idx.shape[0]
            rows = torch.stack([idx[:, 0], idx[:, 1] % (H // s), idx[:, 2] % (W // s)], 1)
            patches, x = g(P, 4, s, s), g(B, 4, H, W)
            got = pm.ops.run_replace(backend, *cu([x, patches, rows, valid]))
            check(f"replace {tag} s={s}", got, reference.replace(x, patches, rows, valid))
            coarse = g(B, 4, H // 4 + 1, W // 4 - 1)
            for src_arg in (None, g(B, 3, H, W)):
                got = pm.ops.run_compose(backend, *cu([coarse, patches, rows, valid]), (H, W),
                                         None if src_arg is None else src_arg.to(dev))
                want = reference.compose(coarse, patches, rows, valid, (H, W), src_arg)
                check(f"compose {tag} s={s} epilogue={src_arg is not None}", got, want, TOL[dtype])


def select_cases(backend):
    for dtype in DTYPES:
        if not runnable(backend, dtype):
            continue
        for shape, k in (((1, 1, 270, 480), 5000), ((3, 1, 37, 53), 100)):
            err = (torch.rand(shape) - 0.1).to(dtype)
            err.view(-1)[::31] = 0.5  # ties
            for prevent in (True, False):
                got = pm.ops.run_select_sampling(backend, err.to(device_of(backend)), k, prevent)
                want = pm.ops.run_select_sampling("cpu", err, k, prevent)
                for name, a, b in zip(("ref", "idx", "valid"), got, want):
                    check(f"select_sampling {backend} {dtype} {shape} {name}", a, b)
            got = pm.ops.run_select_thresholding(backend, err.to(device_of(backend)), 0.5)
            want = pm.ops.run_select_thresholding("cpu", err, 0.5)
            for name, a, b in zip(("ref", "idx"), got, want):
                check(f"select_thresholding {backend} {dtype} {shape} {name}", a, b)


def main():
    which = sys.argv[1]
    backends = sys.argv[2:] or ["cuda", "triton"]
    torch.manual_seed(0)
    for backend in backends:
        if not runnable(backend, torch.float32):
            print(f"skipping backend {backend}: cannot run here", flush=True)
            continue
        {"ops": ops_cases, "select": select_cases}[which](backend)
        if device_of(backend).type == "cuda":
            torch.cuda.synchronize()
        print(f"{which} {backend}: done", flush=True)
    print(f"{len(failures)} wrong results" + (": " + ", ".join(failures) if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
