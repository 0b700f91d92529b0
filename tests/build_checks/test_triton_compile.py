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
                             **{f"x{i}": f"*{dt}" for i in range(6)}}, cfg))
            out.append((Co._replace_kernel,
                        {**ints(Co._replace_kernel, itype), "x_ptr": f"*{dt}", "patch_ptr": f"*{dt}",
                         "cell_ptr": "*i32", "out_ptr": f"*{dt}"}, {"S": 4, "ROWS": 1, "BLOCK": 256}))
            for same in (True, False):
                for epilogue in (True, False):
                    out.append((Co._compose_kernel,
                                {**ints(Co._compose_kernel, itype), "coarse_ptr": f"*{dt}", "patch_ptr": f"*{dt}",
                                 "cell_ptr": "*i32", "src_ptr": f"*{dt}", "out_ptr": f"*{dt}"},
                                {"S": 4, "SAME": same, "EPILOGUE": epilogue, "ROUND": False, "ROWS": 1,
                                 "BLOCK": 256}))
        # Other patch sizes still compile (S is a constexpr).
        out.append((Co._compose_kernel,
                    {**ints(Co._compose_kernel, itype), "coarse_ptr": "*fp32", "patch_ptr": "*fp32",
                     "cell_ptr": "*i32", "src_ptr": "*fp32", "out_ptr": "*fp32"},
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
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, flags=re.M))
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


# -- the fused refiner (kernels/triton/fused.py) --------------------------------

#: (dtype, tl.dot input_precision) of the fused launches the GPU tests make:
#: float32 with TF32 off ("ieee": conftest turns TF32 off, so every float32
#: test but one runs it), float32 with TF32 (test_gpu_tf32_when_allowed, and
#: the default outside the tests), float16 and bfloat16.
FUSED_PRECISIONS = (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "tf32"), ("bf16", "tf32"))

#: Flags of the fused kernel that the GPU tests and the Refiner combine
#: freely (valid given or not, MattingRefine's epilogue or not, coarse maps
#: resampled or already at half resolution). CI compiles them all on (the
#: most code); ``--fused-all`` every combination.
FUSED_FLAGS = ("HAS_VALID", "EPILOGUE", "RESAMPLE")


def _fused_module():
    import importlib
    return importlib.import_module("pymatting_ext.triton_kernels.fused")


def _contiguous_launch(fn, dt, itype, pointers):
    """(signature, constexprs, attrs) of a launch on contiguous 16-byte
    aligned tensors, as Triton specialises it: pointers divisible by 16,
    the specialised integers, the innermost strides (named *sw), equal to 1
    (constexprs), every other integer unspecialised of type itype (an
    integer of neither kind fails fused_main's signature check)."""
    unspecialised = _unspecialised(fn)
    sig, const = {}, {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = pointers.get(name, f"*{dt}")
        elif name.startswith("scale_"):
            sig[name] = "fp32"
        elif name in unspecialised:
            sig[name] = itype
        elif name.endswith("sw"):
            const[name] = 1
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig if n.endswith("_ptr")}
    return sig, const, attrs


def fused_variants(everything=False):
    """(label, kernel, signature, constexprs, attrs, num_warps) of every
    fused launch the GPU tests make, at the launchers' GPU tilings: each
    dtype and precision x kernel sizes 3 and 1 (int32 sizes; with
    `everything` every combination of FUSED_FLAGS), the float16 kernel_size 3
    launch past 2^31 elements (int64 sizes, no valid, epilogue, no resampling:
    test_gpu_past_2_to_the_31_elements), and the coarse pass per dtype."""
    import itertools
    k = _fused_module()
    out = []
    refine = k._refine_kernel
    pointers = dict(map_ptr="*i8", idx_ptr="*i64", valid_ptr="*i1")
    flag_sets = list(itertools.product((True, False), repeat=3)) if everything else [(True, True, True)]
    for (dt, precision), ks, flags in itertools.product(FUSED_PRECISIONS, (3, 1), flag_sets):
        bp, nw = k.launch_config(ks, gpu=True, precision=precision)
        sig, const, attrs = _contiguous_launch(refine, dt, "i32", pointers)
        const.update(K3=ks == 3, ROUND=False, PRECISION=precision, UPCAST=False, BLOCK_P=bp,
                     **dict(zip(FUSED_FLAGS, flags)))
        off = "".join(f" no-{f.lower()}" for f, on in zip(FUSED_FLAGS, flags) if not on)
        out.append((f"refine {dt} {precision} k{ks}{off}", refine, sig, const, attrs, nw))
    bp, nw = k.launch_config(3, gpu=True)
    sig, const, attrs = _contiguous_launch(refine, "fp16", "i64", pointers)
    const.update(K3=True, HAS_VALID=False, EPILOGUE=True, RESAMPLE=False, ROUND=False, PRECISION="tf32",
                 UPCAST=False, BLOCK_P=bp)
    out.append(("refine fp16 tf32 k3 int64 no-has_valid no-resample", refine, sig, const, attrs, nw))
    coarse = k._coarse_kernel
    rows, block = k.coarse_tiling(gpu=True)
    for dt in ("fp32", "fp16", "bf16"):
        for same in ((False, True) if everything else (False,)):
            sig, const, attrs = _contiguous_launch(coarse, dt, "i32", dict(map_ptr="*i8"))
            const.update(SAME=same, EPILOGUE=True, ROUND=False, ROWS=rows, BLOCK=block)
            out.append((f"coarse {dt}" + (" same" if same else ""), coarse, sig, const, attrs, 4))
    return out


def tap_loops(ttgir: str):
    """The bodies (lists of lines) of the TTGIR's outermost scf.for loops: in
    the fused kernel at kernel_size 3, the tap loops of conv1 to conv4."""
    loops, body, depth = [], None, 0
    for line in ttgir.splitlines():
        line = line.strip()
        if body is None:
            if line.startswith("%") and " scf.for " in line and line.endswith("{"):
                body, depth = [], 1
            continue
        depth += line.count("{") - line.count("}")
        if depth <= 0:
            loops.append(body)
            body = None
        else:
            body.append(line)
    return loops


def shuffles(lines):
    """{op: count} of the layout conversions and shared-memory traffic in
    `lines`, and the conversions as 'from -> to' layout names."""
    ops = ("ttg.convert_layout", "ttg.local_alloc", "ttg.local_load", "ttg.local_store",
           "ttg.async_copy_global_to_local", "tt.gather", "ttng.warp_group_dot", "tt.dot")
    counts = {op: sum(1 for line in lines if re.search(rf"(= |^){re.escape(op)} ", line)) for op in ops}
    pairs = [re.search(r": tensor<[^#]*#([\w.]+)[^>]*> -> tensor<[^#]*#([\w.]+)", line)
             for line in lines if "ttg.convert_layout " in line]
    counts["conversions"] = [f"{m.group(1)} -> {m.group(2)}" if m else "?" for m in pairs]
    return counts


def fused_main(everything=False, arch=90):
    """Compiles fused_variants() for sm_`arch` with the launchers' options
    and prints, per variant, registers, spills and shared memory, and per
    tap loop the TTGIR's layout conversions. Fails on a spill, on more than
    MAX_REGISTERS registers with int32 sizes, on a tap loop with more than
    one layout conversion (the one into tl.gather's layout) or one between
    two MMA layouts (the per-tap cost of chained tl.dots), and on a
    contracted FMA while the launchers pin enable_fp_fusion off."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = _fused_module()
    todo = fused_variants(everything)
    check_specialisation([(fn, sig, const) for _, fn, sig, const, _, _ in todo])
    problems = []
    start = time.perf_counter()
    print("| variant | BLOCK_P | warps | registers | spilled bytes | shared memory (bytes) |")
    print("|---|---|---|---|---|---|")
    for label, fn, sig, const, attrs, num_warps in todo:
        signature = {**sig, **{name: "constexpr" for name in const}}
        assert set(signature) == set(fn.arg_names), (fn.__name__, sorted(set(fn.arg_names) ^ set(signature)))
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "enable_fp_fusion": k.FP_FUSION})
        assert ".entry" in compiled.asm["ptx"], label
        usage = resources(compiled.asm["cubin"])
        regs, spilled = (usage[0], usage[1]) if usage is not None else ("?", "?")
        print(f"| {label} | {const.get('BLOCK_P', '-')} | {num_warps} | {regs} | {spilled} | "
              f"{compiled.metadata.shared} |")
        if usage is not None and (spilled or (" int64" not in label and regs > MAX_REGISTERS)):
            problems.append(f"{label}: {regs} registers, {spilled} bytes spilled")
        # enable_fp_fusion off (k.FP_FUSION) leaves no multiply-add contracted;
        # the "ieee" dots' own FMAs are Triton's lowering of tl.dot.
        if not k.FP_FUSION and " ieee " not in f"{label} " and "fma.rn" in compiled.asm["ptx"]:
            problems.append(f"{label}: FMAs in the PTX with enable_fp_fusion off")
        if fn is k._refine_kernel:
            loops = tap_loops(compiled.asm["ttgir"])
            expected = 4 if const["K3"] else 0  # kernel_size 1: one tap, no loop
            if len(loops) < expected:
                problems.append(f"{label}: {len(loops)} tap loops in the TTGIR, expected {expected}")
            for i, body in enumerate(loops[:expected]):
                found = shuffles(body)
                ops = ", ".join(f"{n} {op.split('.')[-1]}" for op, n in found.items() if op != "conversions" and n)
                print(f"    conv{i + 1} per tap: {ops}; conversions {found['conversions']}")
                mma_to_mma = [c for c in found["conversions"] if re.fullmatch(r"mma\d* -> mma\d*", c)]
                if found["ttg.convert_layout"] > 1 or mma_to_mma:
                    problems.append(f"{label}: conv{i + 1} converts layouts {found['conversions']} every tap")
    print(f"{len(todo)} variants in {time.perf_counter() - start:.0f} s")
    assert not problems, "\n".join(problems)
    print(f"compiled {len(todo)} fused variants for sm_{arch}")


def test_fused_kernels_compile_without_spills_or_per_tap_conversions():
    # Every dtype and precision at both kernel sizes with the launchers' GPU
    # tilings, int64 sizes, the coarse pass: 12 variants, 36 s of CPU with an
    # empty Triton cache (65-80 s on 2 busy cores), seconds once cached.
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, __file__, "--fused"], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert "compiled 12 fused variants for sm_90" in proc.stdout, proc.stdout[-3000:]
    print(proc.stdout)


if __name__ == "__main__":
    # python tests/build_checks/test_triton_compile.py [--fused | --fused-all]: the fused
    # kernels only (--fused-all: every flag combination), with their table.
    if "--fused" in sys.argv or "--fused-all" in sys.argv:
        fused_main(everything="--fused-all" in sys.argv)
    else:
        main([80, 90])
