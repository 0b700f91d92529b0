"""Every Triton kernel compiles for real GPUs (sm_80, sm_90), ahead of time
and without one: Triton's full lowering down to PTX and ptxas, which the
interpreter used by the other tests never exercises (types, layouts,
histogram, atomics). Run in a subprocess, because the test session sets
TRITON_INTERPRET=1 before the kernels are defined."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

DTYPES = ("fp32", "fp16", "bf16")


def kernels():
    """(kernel, signature, constexprs) for every kernel and specialisation
    the launchers use, with int32 and int64 scalar arguments."""
    import pymatting_ext.triton_kernels  # noqa: F401
    S = sys.modules["pymatting_ext.triton_kernels.select"]
    Cr = sys.modules["pymatting_ext.triton_kernels.crop"]
    Co = sys.modules["pymatting_ext.triton_kernels.compose"]

    def ints(fn, itype):
        return {n: itype for n in fn.arg_names}

    out = []
    for itype in ("i32", "i64"):
        for dt in DTYPES:
            for d in range(4):
                out.append((S._radix_histogram_kernel,
                            {**ints(S._radix_histogram_kernel, itype), "err_ptr": f"*{dt}", "hist_ptr": "*i64"},
                            {"PASS": d, "BLOCK": 1024}))
            out.append((S._radix_count_kernel,
                        {**ints(S._radix_count_kernel, itype), "err_ptr": f"*{dt}", "hist_ptr": "*i64",
                         "counts_ptr": "*i64"}, {"BLOCK": 1024}))
            for prevent in (True, False):
                out.append((S._radix_write_kernel,
                            {**ints(S._radix_write_kernel, itype), "err_ptr": f"*{dt}", "hist_ptr": "*i64",
                             "counts_ptr": "*i64", "ref_ptr": f"*{dt}", "idx_ptr": "*i64", "valid_ptr": "*i1"},
                            {"PREVENT": prevent, "BLOCK": 1024, "GROUPS": 32}))
            out.append((S._threshold_count_kernel,
                        {**ints(S._threshold_count_kernel, itype), "err_ptr": f"*{dt}", "ref_ptr": "*fp32",
                         "counts_ptr": "*i32", "threshold": "fp32"}, {"BLOCK": 1024}))
            for resample in (True, False):
                out.append((Cr._crop_kernel,
                            {**ints(Cr._crop_kernel, itype), "x_ptr": f"*{dt}", "idx_ptr": "*i64",
                             "out_ptr": f"*{dt}", "scale_h": "fp32", "scale_w": "fp32"},
                            {"RESAMPLE": resample, "BLOCK": 1024}))
            out.append((Co._replace_kernel,
                        {**ints(Co._replace_kernel, itype), "x_ptr": f"*{dt}", "patch_ptr": f"*{dt}",
                         "cell_ptr": "*i32", "out_ptr": f"*{dt}"}, {"BLOCK": 1024}))
            for same in (True, False):
                for epilogue in (True, False):
                    out.append((Co._compose_kernel,
                                {**ints(Co._compose_kernel, itype), "coarse_ptr": f"*{dt}", "patch_ptr": f"*{dt}",
                                 "cell_ptr": "*i32", "src_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                                 "scale_h": "fp32", "scale_w": "fp32"},
                                {"SAME": same, "EPILOGUE": epilogue, "BLOCK": 1024}))
        out.append((S._threshold_write_kernel,
                    {**ints(S._threshold_write_kernel, itype), "ref_ptr": "*fp32", "ends_ptr": "*i64",
                     "idx_ptr": "*i64"}, {"BLOCK": 1024}))
        for has_valid in (True, False):
            out.append((Co._cell_map_kernel,
                        {**ints(Co._cell_map_kernel, itype), "idx_ptr": "*i64", "valid_ptr": "*i1", "map_ptr": "*i32"},
                        {"HAS_VALID": has_valid, "BLOCK": 1024}))
    return out


def main(archs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    todo = kernels()
    for fn, signature, constexprs in todo:
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        assert set(signature) == set(fn.arg_names), (fn.__name__, sorted(signature), fn.arg_names)
        for arch in archs:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            assert ".entry" in compiled.asm["ptx"], fn.__name__
    print(f"compiled {len(todo)} kernels for sm_{archs}")


def test_every_triton_kernel_compiles_for_the_gpu():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled" in proc.stdout


if __name__ == "__main__":
    main([80, 90])
