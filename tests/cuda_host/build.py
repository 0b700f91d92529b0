"""Builds and loads the host execution harness: the CUDA kernels of
kernels/cuda compiled as C++ (g++) and registered for CPU tensors as
torch.ops.pymatting_ext_cuda_host.* (the schemas of csrc/ops.cpp, the host
wrappers and kernels of kernels/cuda/*.cu, unchanged), with runtime.cpp
running them one fiber per GPU thread.

The library is compiled once per machine and source state: it is cached under
$PYMATTING_EXT_CUDA_HOST_CACHE (default ~/.cache/pymatting_ext/cuda_host)
in a folder named by a hash of every source it reads, the flags, the compiler
and torch. Concurrent builds (several test processes) wait on a file lock.

Flags, and why:
- the kernel units: -fsanitize=thread, whose load/store callbacks the
  runtime defines (bounds and shared-memory race checks; TSan's own runtime
  is not linked), and -fsanitize=alignment (misaligned vector accesses);
  -O1, which compiles ~2x faster than -O2 and runs these small tests fast
  enough; -ffp-contract=off, so that g++ rounds every product and sum as
  the CPU kernels do (nvcc contracts a * b + c into an FMA; the tests allow
  for that where the GPU's result would differ).
- runtime.cpp: -O2, no instrumentation (its own memory is not the kernels').
"""
import fcntl
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "kernels" / "cuda"
CSRC = ROOT / "csrc"

#: The kernel translation units (one per .cu: their anonymous namespaces
#: share names).
KERNEL_UNITS = sorted(HERE.glob("host_*.cpp"))
NAMESPACE = "pymatting_ext_cuda_host"

COMMON = ["-std=c++20", "-fPIC", "-Wno-unknown-pragmas", "-DPYMATTING_EXT_CUDA_HOST",
          f"-Dpymatting_ext={NAMESPACE}",
          f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
KERNEL_FLAGS = ["-O1", "-ffp-contract=off", "-fsanitize=thread", "-fsanitize=alignment",
                "-fno-sanitize-recover=alignment"]
RUNTIME_FLAGS = ["-O2"]


def _includes():
    dirs = [HERE, KERNELS, CSRC] + [Path(p) for p in cpp_extension.include_paths()]
    import sysconfig
    dirs.append(Path(sysconfig.get_paths()["include"]))
    return [f"-I{d}" for d in dirs]


def _cxx():
    return os.environ.get("CXX", "g++")


def _inputs():
    files = sorted(set(HERE.rglob("*.cpp")) | set(HERE.rglob("*.h")) | set(HERE.rglob("*.cuh"))
                   | set(KERNELS.glob("*.cu")) | set(KERNELS.glob("*.cuh")) | set(CSRC.rglob("*.h"))
                   | {CSRC / "ops.cpp", Path(__file__).resolve()})
    return files


def source_hash():
    h = hashlib.sha256()
    for f in _inputs():
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    version = subprocess.run([_cxx(), "--version"], capture_output=True, text=True).stdout
    for part in (COMMON, KERNEL_FLAGS, RUNTIME_FLAGS, [torch.__version__, version, sys.version]):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def cache_root():
    default = Path.home() / ".cache" / "pymatting_ext" / "cuda_host"
    return Path(os.environ.get("PYMATTING_EXT_CUDA_HOST_CACHE", default))


def _compile(src, obj, flags):
    cmd = [_cxx(), *COMMON, *flags, *_includes(), "-c", str(src), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {src} for the CUDA host harness failed:\n{' '.join(cmd)}\n{done.stderr[-8000:]}")
    return obj


def build(jobs=None):
    """The path of the harness library, compiled first if this source state
    has no cached build."""
    out = cache_root() / source_hash()
    lib = out / "libpymatting_ext_cuda_host.so"
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        units = [(src, out / (src.stem + ".o"), KERNEL_FLAGS) for src in KERNEL_UNITS]
        units += [(HERE / "runtime.cpp", out / "runtime.o", RUNTIME_FLAGS),
                  (CSRC / "ops.cpp", out / "ops.o", RUNTIME_FLAGS)]
        # NB: the slowest units first, so that two jobs finish together.
        units.sort(key=lambda u: u[0].name != "host_select_kernel.cpp")
        with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
            objs = list(pool.map(lambda u: _compile(*u), units))
        libdir = Path(torch.__file__).parent / "lib"
        tmp = out / "lib.so.tmp"
        cmd = [_cxx(), "-shared", "-o", str(tmp), *map(str, objs), f"-L{libdir}", "-lc10", "-ltorch_cpu",
               f"-Wl,-rpath,{libdir}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"linking the CUDA host harness failed:\n{' '.join(cmd)}\n{done.stderr[-8000:]}")
        os.replace(tmp, lib)
    return lib


_loaded = None


def load():
    """torch.ops.pymatting_ext_cuda_host, built and loaded once a process."""
    global _loaded
    if _loaded is None:
        torch.ops.load_library(str(build()))
        _loaded = getattr(torch.ops, NAMESPACE)
    return _loaded


if __name__ == "__main__":
    print(build())
