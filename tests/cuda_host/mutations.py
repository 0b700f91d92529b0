"""Mutation checks of the host execution harness: each plants one defect in a
copy of kernels/cuda (never in the tree), builds the harness from the copy
(build.py; only the mutated unit recompiles), runs a case that reaches the
defect in a child process, and prints the harness's error. The same case on
the unmutated kernels must run clean, and every mutation must be caught.

    python3 tests/cuda_host/mutations.py [name ...]

Takes ~1 minute per mutation on two cores (its unit's compile); not part of
the pytest run."""
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import build

CROP = """
x = torch.rand(2, 3, 12, 16); y = torch.rand(2, 2, 6, 8)
idx = torch.tensor([[0, 0, 0], [1, 2, 3], [1, 5, 7], [0, 5, 0]])
ops.crop([x, y], idx, 2, 1, [12, 16], [4, 4])
"""
CROP_BOTTOM_EDGE = """
x = torch.rand(1, 1, 12, 16)
idx = torch.tensor([[0, 5, 7]])
ops.crop([x], idx, 2, 1, [12, 16], [4, 4])
"""
CROP_INTO_UNALIGNED = """
x = torch.rand(2, 3, 12, 16); P, C = 3, 8
idx = torch.tensor([[0, 0, 0], [1, 2, 3], [1, 5, 7]])
flat = torch.zeros(1 + P * C * 16)
out = flat.as_strided((P, C, 4, 4), (C * 16, 1, 4 * C, C), 1)
ops.crop_into([x, x[:, :1]], idx, 2, 1, [12, 16], 4, out)
"""
SELECT = """
ops.select_sampling(torch.rand(2, 1, 20, 30), 50, True)
"""
THRESHOLD = """
ops.select_thresholding(torch.rand(2, 1, 20, 30), 0.5)
"""

#: name: (file, the original text, the mutated text, the case that reaches it)
MUTATIONS = {
    "removed __syncthreads (crop: the tile is stored before every thread filled it)": (
        "crop_kernel.cu", "      }\n    }\n  }\n  __syncthreads();\n", "      }\n    }\n  }\n", CROP),
    "off-by-one in crop (the image's last row counted inside)": (
        "crop_kernel.cu", "inside = y >= 0 && y < sh.H &&", "inside = y >= 0 && y <= sh.H &&", CROP_BOTTOM_EDGE),
    "off-by-one in crop (the dense tile's tail stores one element more)": (
        "crop_kernel.cu", "for (int e = head + nvec * kV + threadIdx.x; e < E; e += T)",
        "for (int e = head + nvec * kV + threadIdx.x; e <= E; e += T)", CROP),
    "a lane missing from a mask (select's histogram, lane 31)": (
        "select_kernel.cu", "__match_any_sync(0xFFFFFFFFu, bin)", "__match_any_sync(0x7FFFFFFFu, bin)", SELECT),
    "misaligned vector store (crop_into's run width ignores out's address)": (
        "crop_kernel.cu", "(C_out * sz) % run_bytes != 0 ||\n                                first_addr % run_bytes != 0)",
        "(C_out * sz) % run_bytes != 0)", CROP_INTO_UNALIGNED),
    "barrier divergence (a thread leaves threshold_write before the block's scan)": (
        "select_kernel.cu", "  if (count == 0) {\n    return;", "  if (count == 0 || threadIdx.x == 5) {\n    return;",
        THRESHOLD),
}


def run_case(lib, case):
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        ops = torch.ops.pymatting_ext_cuda_host
        ops.track_allocations(True)
        torch.manual_seed(0)
        try:
    """) + textwrap.indent(textwrap.dedent(case), "    ") + textwrap.dedent("""
        except RuntimeError as e:
            print("CAUGHT:", str(e).splitlines()[0])
        else:
            print("RAN CLEAN")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    out = done.stdout.strip().splitlines()
    return out[-1] if out else f"NO OUTPUT (exit {done.returncode}): {done.stderr[-2000:]}"


def main(names):
    clean = build.build()
    failures = 0
    for name, (file, old, new, case) in MUTATIONS.items():
        if names and not any(n in name for n in names):
            continue
        base = run_case(clean, case)
        with tempfile.TemporaryDirectory() as tmp:
            kernels = Path(tmp) / "cuda"
            shutil.copytree(build.KERNELS, kernels)
            text = (kernels / file).read_text()
            assert text.count(old) == 1, f"{name}: the original text is not found once in {file}"
            (kernels / file).write_text(text.replace(old, new))
            got = run_case(build.build(kernels), case)
        ok = base == "RAN CLEAN" and got.startswith("CAUGHT:")
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}\n     unmutated: {base}\n     mutated:   {got}\n", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:]) else 0)
