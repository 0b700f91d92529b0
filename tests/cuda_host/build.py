"""Builds and loads the host execution harness: the CUDA kernels of
kernels/cuda compiled as C++ (g++) and registered for CPU tensors as
torch.ops.pymatting_ext_cuda_host.* (the schemas of csrc/ops.cpp, the host
wrappers and kernels of kernels/cuda/*.cu, unchanged), with runtime.cpp
running them one fiber per GPU thread.

The library is compiled once per machine and source state: it is cached under
$PYMATTING_EXT_CUDA_HOST_CACHE (default ~/.cache/pymatting_ext/cuda_host),
each object by a hash of its source, the headers, the flags, the compiler
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


def _includes(kernels):
    import sysconfig
    dirs = [HERE, kernels, CSRC] + [Path(p) for p in cpp_extension.include_paths()]
    dirs.append(Path(sysconfig.get_paths()["include"]))
    return [f"-I{d}" for d in dirs]


def _cxx():
    return os.environ.get("CXX", "g++")


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:16]


def _files_digest(files):
    return _digest(*(f.name.encode() + b"\0" + f.read_bytes() for f in sorted(files)))


def cache_root():
    default = Path.home() / ".cache" / "pymatting_ext" / "cuda_host"
    return Path(os.environ.get("PYMATTING_EXT_CUDA_HOST_CACHE", default))


def _units(kernels):
    """(source, the file whose content it compiles, flags) per object."""
    # host_<op>.cpp compiles kernels/<op>.cu; host_checks.cpp is its own.
    units = [(src, next((f for f in [kernels / (src.stem[len("host_"):] + ".cu")] if f.exists()), src), KERNEL_FLAGS)
             for src in KERNEL_UNITS]
    units += [(HERE / "runtime.cpp", HERE / "runtime.cpp", RUNTIME_FLAGS), (CSRC / "ops.cpp", CSRC / "ops.cpp",
                                                                               RUNTIME_FLAGS)]
    # NB: the slowest unit first, so that two jobs finish together.
    return sorted(units, key=lambda u: u[0].name != "host_select_kernel.cpp")


def _compile(src, obj, flags, kernels):
    cmd = [_cxx(), *COMMON, *flags, *_includes(kernels), "-c", str(src), "-o", str(obj) + ".tmp"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {src} for the CUDA host harness failed:\n{' '.join(cmd)}\n{done.stderr[-8000:]}")
    os.replace(str(obj) + ".tmp", obj)
    return obj


def build(kernels=KERNELS, jobs=None):
    """The path of the harness library for the kernel sources in `kernels`,
    compiled first where this source state has no cached build. Objects are
    cached one by one (a unit recompiles when its own source or a header
    changes), the library by the set of its objects."""
    kernels = Path(kernels)
    version = subprocess.run([_cxx(), "--version"], capture_output=True, text=True, check=True).stdout
    headers = (set(HERE.rglob("*.h")) | set(HERE.rglob("*.cuh")) | set(kernels.glob("*.cuh"))
               | set(CSRC.rglob("*.h")))
    common = _digest(_files_digest(headers), COMMON, torch.__version__, version, sys.version)
    root = cache_root()
    objs = [(src, root / "obj" / f"{src.stem}-{_digest(common, flags, own.read_bytes())}.o", flags)
            for src, own, flags in _units(kernels)]
    out = root / _digest(*(str(o) for _, o, _ in objs))
    lib = out / "libpymatting_ext_cuda_host.so"
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    (root / "obj").mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        todo = [u for u in objs if not u[1].exists()]
        with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
            list(pool.map(lambda u: _compile(*u, kernels), todo))
        libdir = Path(torch.__file__).parent / "lib"
        tmp = out / "lib.so.tmp"
        cmd = [_cxx(), "-shared", "-o", str(tmp), *(str(o) for _, o, _ in objs), f"-L{libdir}", "-lc10",
               "-ltorch_cpu", f"-Wl,-rpath,{libdir}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
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
    print(build(*sys.argv[1:2]))
