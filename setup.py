"""Build of pymatting_ext and its compiled extension pymatting_ext._C.

The C++ CPU kernels are always built. The CUDA sources under kernels/cuda are
added whenever the installed torch has CUDA and a CUDA toolkit (nvcc) is
found; no GPU is needed to build them. Environment variables:

  CUDA_HOME / CUDA_PATH        toolkit root (default: /usr/local/cuda, then
                               /usr/local/cuda-*, then nvcc's real location)
  PYMATTING_EXT_CUDA=0|1       force the CUDA sources off / on
  TORCH_CUDA_ARCH_LIST         architectures (default: 7.5;8.0;9.0+PTX)
  MAX_JOBS                     parallel compile jobs (torch's variable)
  PYMATTING_EXT_REUSE=0        always compile (see below)

The extension is compiled only when needed: setup.py records a hash of
everything that goes into it (the C++/CUDA sources and headers, the compiler
flags, torch's version, the toolkit, the Python ABI) in
pymatting_ext/_build_config.py, and when an installed pymatting_ext (outside
this source tree, in the environment that runs the build) holds an
extension with the same hash, copies that file instead of compiling it. The
Python files are installed from the checkout either way. Without an
installed match, ninja still skips the objects under build/ that are up to
date.
"""
import ast
import ctypes
import glob
import hashlib
import importlib.machinery
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"

#: The extras; tests/run.sh and benchmarks/run.sh install the same lists.
CLI_REQUIRES = ["torchvision", "av", "tqdm", "pillow", "matplotlib", "numpy", "opencv-python-headless"]
EXPORT_REQUIRES = ["onnx", "onnxruntime", "onnxscript"]


def _nvcc_root(nvcc):
    """The toolkit root behind an nvcc, following wrapper scripts that exec
    the real compiler (torch would take the wrapper's folder for the root)."""
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        for token in head.decode("utf-8", "replace").split():
            token = token.strip("\"'")
            if token.endswith("/bin/nvcc") and os.path.isfile(token):
                real = os.path.realpath(token)
                break
    return os.path.dirname(os.path.dirname(real))


def find_cuda_home():
    """(root, how it was found), or (None, why not)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if os.path.isfile(os.path.join(value, "bin", "nvcc")):
                return value, f"${var}"
            return None, f"${var}={value} has no bin/nvcc"
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate, "standard location"
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _nvcc_root(nvcc)
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root, f"nvcc on PATH ({nvcc})"
    return None, "no nvcc found (set CUDA_HOME)"


def pip_cuda_include_dirs():
    """Header folders of pip's NVIDIA packages (nvidia/cu13/include, or the
    per-library nvidia/*/include of older releases): torch's CUDA headers
    include cusparse.h and friends, which a bare toolkit may lack."""
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry or ".", "nvidia")
        if os.path.isdir(base):
            dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    seen, unique = set(), []
    for d in dirs:
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def libstdcxx_link_args(cxx):
    """Extra link arguments so that the extension uses the shared libstdc++.

    NB: some toolchains (a g++ wrapper with its own -B folders) find only
    libstdc++.a and link it into the extension; a C++ exception raised in
    torch's libraries (every TORCH_CHECK) then crashes the process instead of
    reaching Python. There, link the libstdc++ that torch itself has loaded.
    Call after importing torch."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        found = subprocess.run(shlex.split(cxx) + ["-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                return [path]
    return []


#: Headers the compiled sources may include (relative globs), without and
#: with the CUDA sources.
HEADERS = ("csrc/**/*.h", "csrc/**/*.hpp")
CUDA_HEADERS = ("kernels/cuda/**/*.cuh", "kernels/cuda/**/*.h")


def extension_hash(sources, with_cuda, settings):
    """sha256 of the extension's inputs: the compiled sources and every header
    they may include (path and contents), and the build settings (flags,
    torch, toolkit, Python ABI)."""
    digest = hashlib.sha256()
    patterns = HEADERS + (CUDA_HEADERS if with_cuda else ())
    files = sorted({os.path.relpath(os.path.join(ROOT, f), ROOT) for f in sources}
                   | {os.path.relpath(f, ROOT) for pattern in patterns
                      for f in glob.glob(os.path.join(ROOT, pattern), recursive=True)})
    for rel in files:
        digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(ROOT, rel), "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def installed_extension():
    """(path of _C, its recorded build config) of a pymatting_ext installed
    anywhere but this source folder (an environment inside the checkout
    counts), or (None, None)."""
    here = {os.path.realpath(ROOT), os.path.realpath(os.getcwd())}
    path = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) not in here]
    spec = importlib.machinery.PathFinder.find_spec("pymatting_ext", path)
    if spec is None or not spec.submodule_search_locations:
        return None, None
    folder = list(spec.submodule_search_locations)[0]
    # NB: only the source folder itself is excluded: an environment may live
    # inside the checkout (say ./venv), and its installed copy counts.
    if os.path.realpath(folder) == os.path.realpath(os.path.join(ROOT, "pymatting_ext")):
        return None, None
    library = os.path.join(folder, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    try:
        with open(os.path.join(folder, "_build_config.py")) as f:
            tree = ast.parse(f.read())
        config = next(ast.literal_eval(node.value) for node in tree.body
                      if isinstance(node, ast.Assign) and node.targets[0].id == "BUILD_CONFIG")
    except (OSError, SyntaxError, ValueError, StopIteration, AttributeError):
        return None, None
    return (library if os.path.isfile(library) else None), config


def reusable_extension(ext_hash):
    """The installed extension's file if it was built with exactly these
    inputs (same hash), else None; says what it found."""
    if os.environ.get("PYMATTING_EXT_REUSE") == "0":
        print("pymatting_ext extension: PYMATTING_EXT_REUSE=0: compiling the extension")
        return None
    library, config = installed_extension()
    if library is None:
        print("pymatting_ext extension: no installed build to reuse: compiling the extension")
        return None
    if config.get("ext_hash") != ext_hash:
        print(f"pymatting_ext extension: the installed build ({library}) was built from other sources or settings: "
              f"compiling the extension")
        return None
    import torch  # noqa: F401  (loaded first, so that the library's libc10, libtorch ... resolve)

    try:
        ctypes.CDLL(library)
    except OSError as exc:
        print(f"pymatting_ext extension: the installed build of the same sources does not load ({exc}): compiling the "
              f"extension")
        return None
    print(f"pymatting_ext extension: reusing the installed build of the same sources and settings ({library}, "
          f"hash {ext_hash[:12]}): not compiling")
    return library


def build_extension_config():
    cuda_home, cuda_how = find_cuda_home()
    if cuda_home:
        # NB: torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    want = os.environ.get("PYMATTING_EXT_CUDA")
    torch_cuda = torch.version.cuda
    if want == "0":
        with_cuda, why = False, "PYMATTING_EXT_CUDA=0"
    elif torch_cuda is None:
        with_cuda, why = False, f"torch {torch.__version__} has no CUDA"
    elif cuda_home is None:
        with_cuda, why = False, cuda_how
    else:
        with_cuda, why = True, f"toolkit {cuda_home} ({cuda_how})"
    if want == "1" and not with_cuda:
        raise RuntimeError(f"PYMATTING_EXT_CUDA=1 but the CUDA sources cannot be built: {why}")

    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    link_args = ["-fopenmp"] + libstdcxx_link_args(cxx)

    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # NB: at::parallel_for is inline and runs serially unless compiled with
    # OpenMP, torch's CPU thread pool.
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    extra = {"cxx": cxx_flags}
    arch_list = None
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join("kernels", "cuda", "*.cu")))
        include_dirs += pip_cuda_include_dirs()
        define_macros.append(("PYMATTING_EXT_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension

    config = {
        "torch": torch.__version__,
        "torch_cuda": torch_cuda,
        "with_cuda": with_cuda,
        "cuda_home": cuda_home if with_cuda else None,
        "arch_list": arch_list,
        "reason": why,
        "link_args": link_args,
    }
    # NB: paths inside the checkout count relative to it, so that another
    # clone of the same sources matches.
    settings = dict(config, reason=None, sources=sources, macros=define_macros,
                    include_dirs=[os.path.relpath(d, ROOT) if d.startswith(ROOT) else d for d in include_dirs],
                    flags=extra, cxx=cxx, python=sysconfig.get_config_var("EXT_SUFFIX"),
                    abi=int(torch._C._GLIBCXX_USE_CXX11_ABI))
    config["ext_hash"] = extension_hash(sources, with_cuda, settings)
    print("pymatting_ext build configuration:")
    for key, value in config.items():
        print(f"  {key:10s} {value}")
    if with_cuda:
        print(f"  includes   {include_dirs[1:]}")
    # NB: looked up before _build_config.py is rewritten below (an in-place
    # build's own file is never a candidate anyway).
    reuse = reusable_extension(config["ext_hash"])

    # Recorded so that a failed load of _C can say what it was built for, and
    # so that a later build of the same inputs can reuse this one.
    with open(os.path.join(ROOT, "pymatting_ext", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"BUILD_CONFIG = {config!r}\n")

    ext = ext_cls(
        "pymatting_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_args,
    )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """torch's BuildExtension, or a copy of the installed extension when
        it was built from the same inputs (see reusable_extension)."""

        def build_extension(self, extension):
            target = self.get_ext_fullpath(extension.name)
            if reuse is None:
                return super().build_extension(extension)
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            if not (os.path.exists(target) and os.path.samefile(reuse, target)):
                shutil.copy2(reuse, target)

    return ext, BuildExt


def main():
    # Metadata-only invocations (egg_info, sdist) need no compiler.
    ext, build_ext = build_extension_config()
    setup(
        name="pymatting_ext",
        version="0.1.0",
        description="Fast CPU/CUDA/Triton kernels for BackgroundMattingV2's refiner, as a drop-in replacement.",
        # NB: the Triton kernels live in kernels/triton beside the CUDA ones and
        # are installed as pymatting_ext.triton_kernels.
        packages=find_packages(include=["pymatting_ext", "pymatting_ext.*"]) + ["pymatting_ext.triton_kernels"],
        package_dir={"pymatting_ext.triton_kernels": "kernels/triton"},
        ext_modules=[ext],
        cmdclass={"build_ext": build_ext},
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        extras_require={"test": ["pytest", "backgroundmattingv2==1.0", "torchvision"],
                        "models": ["torchvision"], "triton": ["triton"],
                        # The command line (pymatting-ext) and convert_video.
                        "cli": CLI_REQUIRES,
                        # pymatting-ext export --format onnx, checked with onnxruntime.
                        "export": EXPORT_REQUIRES},
        entry_points={"console_scripts": ["pymatting-ext = pymatting_ext.app.cli:main"]},
    )


if __name__ == "__main__":
    main()
