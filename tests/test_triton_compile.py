"""Every Triton kernel compiles for real GPUs (sm_80, sm_90), ahead of time
and without one: Triton's full lowering down to PTX and ptxas, which the
interpreter used by the other tests never exercises (types, layouts,
histogram, atomics). Run in a subprocess, because the test session sets
TRITON_INTERPRET=1 before the kernels are defined.

Where Triton ships cuobjdump, the compiled kernels are also checked for
spills to local memory and a register budget (registers per thread bound
the number of resident warps, which hide the latency of the gathers), and
their register and SASS instruction counts are printed."""
import os
import re
import subprocess
import sys
import tempfile

import pytest

pytest.importorskip("triton")

DTYPES = ("fp32", "fp16", "bf16")

#: Integer arguments that stay specialised (==1 lets Triton vectorise rows):
#: innermost strides of the tensors that replace and compose stream through.
SPECIALISED_INTS = {"sxw", "sow", "ssw"}

#: Registers per thread no kernel may exceed with int32 sizes (255 is the
#: hardware limit; beyond ~128 fewer than a third of the warps fit on an
#: SM). int64 sizes (arguments of 2^31 or more) only must not spill.
MAX_REGISTERS = 128


def _crop_configs():
    """The crop kernel's constexprs: the refiner's two launches (coarse +
    full-size inputs resampled; full-size inputs read directly), and one
    input per group with int64 pixel arithmetic and rounded weights."""
    base = {f"CB{i}": 1 for i in range(6)}
    return [
        {**base, "NA": 3, "NB": 2, "RESAMPLE_A": True, "RESAMPLE_B": True, "CB0": 8, "CB1": 1, "CB2": 4,
         "CB3": 4, "CB4": 4, "ROUND": False, "WIDE": False, "BLOCK": 128},
        {**base, "NA": 2, "NB": 0, "RESAMPLE_A": False, "RESAMPLE_B": False, "CB0": 4, "CB1": 4,
         "ROUND": False, "WIDE": False, "BLOCK": 128},
        {**base, "NA": 1, "NB": 1, "RESAMPLE_A": False, "RESAMPLE_B": True, "CB0": 2, "CB3": 8,
         "ROUND": True, "WIDE": True, "BLOCK": 128},
    ]


def kernels():
    """(kernel, signature, constexprs) for every kernel and specialisation
    the launchers use on a GPU, with int32 and int64 scalar arguments."""
    import pymatting_ext.triton_kernels  # noqa: F401
    S = sys.modules["pymatting_ext.triton_kernels.select"]
    Cr = sys.modules["pymatting_ext.triton_kernels.crop"]
    Co = sys.modules["pymatting_ext.triton_kernels.compose"]

    def ints(fn, itype):
        return {n: itype for n in fn.arg_names}

    out = []
    for itype in ("i32", "i64"):
        for dt in DTYPES:
            key_bits = 32 if dt == "fp32" else 16
            for d in range(key_bits // 8):
                out.append((S._radix_histogram_kernel,
                            {**ints(S._radix_histogram_kernel, itype), "err_ptr": f"*{dt}", "hist_ptr": "*i64"},
                            {"PASS": d, "KEY_BITS": key_bits, "BLOCK": 1024}))
            out.append((S._radix_count_kernel,
                        {**ints(S._radix_count_kernel, itype), "err_ptr": f"*{dt}", "hist_ptr": "*i64",
                         "counts_ptr": "*i32"}, {"KEY_BITS": key_bits, "BLOCK": 1024}))
            for prevent in (True, False):
                out.append((S._radix_write_kernel,
                            {**ints(S._radix_write_kernel, itype), "err_ptr": f"*{dt}", "hist_ptr": "*i64",
                             "counts_ptr": "*i32", "ref_ptr": f"*{dt}", "idx_ptr": "*i64", "valid_ptr": "*i1"},
                            {"PREVENT": prevent, "KEY_BITS": key_bits, "BLOCK": 1024, "GROUPS": S._MAX_GROUPS}))
            out.append((S._threshold_count_kernel,
                        {**ints(S._threshold_count_kernel, itype), "err_ptr": f"*{dt}", "ref_ptr": "*fp32",
                         "counts_ptr": "*i32", "thr_key": "i32"}, {"KEY_BITS": key_bits, "BLOCK": 1024}))
            for cfg in _crop_configs():
                out.append((Cr._crop_kernel,
                            {**ints(Cr._crop_kernel, itype), "idx_ptr": "*i64", "out_ptr": f"*{dt}",
                             **{f"x{i}": f"*{dt}" for i in range(6)},
                             **{f"{g}_scale_{a}": "fp32" for g in "ab" for a in "hw"}}, cfg))
            out.append((Co._replace_kernel,
                        {**ints(Co._replace_kernel, itype), "x_ptr": f"*{dt}", "patch_ptr": f"*{dt}",
                         "cell_ptr": "*i32", "out_ptr": f"*{dt}"}, {"S": 4, "ROWS": 1, "BLOCK": 256}))
            for same in (True, False):
                for epilogue in (True, False):
                    out.append((Co._compose_kernel,
                                {**ints(Co._compose_kernel, itype), "coarse_ptr": f"*{dt}", "patch_ptr": f"*{dt}",
                                 "cell_ptr": "*i32", "src_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                                 "scale_h": "fp32", "scale_w": "fp32"},
                                {"S": 4, "SAME": same, "EPILOGUE": epilogue, "ROUND": False, "ROWS": 1,
                                 "BLOCK": 256}))
        # Other patch sizes still compile (S is a constexpr).
        out.append((Co._compose_kernel,
                    {**ints(Co._compose_kernel, itype), "coarse_ptr": "*fp32", "patch_ptr": "*fp32",
                     "cell_ptr": "*i32", "src_ptr": "*fp32", "out_ptr": "*fp32", "scale_h": "fp32", "scale_w": "fp32"},
                    {"S": 3, "SAME": False, "EPILOGUE": True, "ROUND": True, "ROWS": 1, "BLOCK": 256}))
        out.append((S._threshold_write_kernel,
                    {**ints(S._threshold_write_kernel, itype), "ref_ptr": "*fp32", "ends_ptr": "*i64",
                     "idx_ptr": "*i64"}, {"BLOCK": 1024}))
        for has_valid in (True, False):
            out.append((Co._cell_map_kernel,
                        {**ints(Co._cell_map_kernel, itype), "idx_ptr": "*i64", "valid_ptr": "*i1", "map_ptr": "*i32"},
                        {"HAS_VALID": has_valid, "BLOCK": 1024}))
    return out


def _unspecialised(fn):
    """The argument names Triton will not specialise, from its own flags
    where it has them (a misspelt do_not_specialize name is silently
    ignored)."""
    params = getattr(fn, "params", None)
    if params and hasattr(params[0], "do_not_specialize"):
        return {p.name for p in params if p.do_not_specialize}
    return {n if isinstance(n, str) else fn.arg_names[n] for n in fn.do_not_specialize}


def check_specialisation(todo):
    """Every integer argument is unspecialised but the few listed."""
    for fn in {id(fn): fn for fn, _, _ in todo}.values():
        names = {n if isinstance(n, str) else fn.arg_names[n] for n in fn.do_not_specialize}
        assert names <= set(fn.arg_names), (fn.__name__, sorted(names - set(fn.arg_names)))
    for fn, signature, constexprs in todo:
        unspecialised = _unspecialised(fn)
        for name, ty in signature.items():
            if ty in ("i32", "i64") and name not in constexprs:
                assert name in unspecialised or name in SPECIALISED_INTS, (fn.__name__, name)


def resources(cubin: bytes):
    """(registers, spill/stack bytes, SASS instructions) from cuobjdump, or
    None where Triton does not ship it."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if m is None:
        return None
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+\S", sass, flags=re.M))
    return int(m.group(1)), int(m.group(2)) + int(m.group(3)), instructions


def main(archs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    todo = kernels()
    check_specialisation(todo)
    problems = []
    for fn, signature, constexprs in todo:
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        assert set(signature) == set(fn.arg_names), (fn.__name__, sorted(signature), fn.arg_names)
        for arch in archs:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))
            assert ".entry" in compiled.asm["ptx"], fn.__name__
            usage = resources(compiled.asm["cubin"]) if arch == archs[-1] else None
            if usage is not None:
                regs, spilled, instructions = usage
                itype = next((t for t in signature.values() if t in ("i32", "i64")), "")
                print(f"sm_{arch} {fn.__name__} {itype} {constexprs}: {regs} registers, {spilled} bytes spilled, "
                      f"{instructions} SASS instructions")
                if spilled or (itype == "i32" and regs > MAX_REGISTERS):
                    problems.append(f"{fn.__name__} {constexprs}: {regs} registers, {spilled} bytes spilled")
    assert not problems, "\n".join(problems)
    print(f"compiled {len(todo)} kernels for sm_{archs}")


def test_every_triton_kernel_compiles_for_the_gpu():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "compiled" in proc.stdout


if __name__ == "__main__":
    main([80, 90])
