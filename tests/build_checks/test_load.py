"""What `import pymatting_ext` says when its compiled extension cannot be
loaded: each cause told apart, with its own remedy. Each case runs in a child
process on a copy of the package's Python files in a temporary folder, where
a stand-in `_C.py` raises the error of that cause (Python imports `_C.py`
where no compiled `_C` exists) and `_build_config.py` records the build."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pymatting_ext

PACKAGE = os.path.dirname(os.path.abspath(pymatting_ext.__file__))


def make_copy(root, raise_stmt=None, config_torch=None, compiled=True, source_tree=False):
    """A copy of the package under root/pymatting_ext (its Python files),
    with a `_C.py` running raise_stmt and, if compiled, a (fake) compiled
    file beside it so that the folder looks installed; returns root."""
    dst = os.path.join(root, "pymatting_ext")
    os.makedirs(dst)
    for name in os.listdir(PACKAGE):
        if name.endswith(".py") and name not in ("_build_config.py", "_C.py"):
            shutil.copy(os.path.join(PACKAGE, name), dst)
    if raise_stmt is not None:
        with open(os.path.join(dst, "_C.py"), "w") as f:
            f.write(raise_stmt + "\n")
    if compiled:
        # Named like an extension but never imported: _C.py is found first
        # only when no loadable _C.*.so exists, so use a suffix Python does
        # not load ("_C.so" is one it would): the diagnosis only globs.
        open(os.path.join(dst, "_C.cpython-0-fake.so"), "w").close()
    if config_torch is not None:
        with open(os.path.join(dst, "_build_config.py"), "w") as f:
            f.write(f"BUILD_CONFIG = {{'torch': {config_torch!r}, 'torch_cuda': '13.0', 'with_cuda': True, "
                    f"'reason': 'test'}}\n")
    if source_tree:
        open(os.path.join(root, "setup.py"), "w").close()
    return root


def import_message(root, cwd=None, extra_path=()):
    """The RuntimeWarning text of `import pymatting_ext` from root, and the
    error asking for the CPU backend raises."""
    code = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pymatting_ext
        print("WARN:", " | ".join(str(w.message) for w in caught if w.category is RuntimeWarning))
        print("FILE:", pymatting_ext.__file__)
        try:
            pymatting_ext._backend.resolve("cpu", __import__("torch").device("cpu"))
        except RuntimeError as e:
            print("RAISE:", e)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *extra_path]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd or root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    return lines.get("WARN", ""), lines.get("RAISE", ""), lines.get("FILE", "")


def test_source_folder_says_so_and_names_the_installed_copy(tmp_path):
    # A checkout never built in place (its _build_config.py matches this
    # torch: setup.py writes it there on any build), run from its root while
    # the built package is installed elsewhere.
    installed = os.path.dirname(PACKAGE)
    root = make_copy(str(tmp_path), raise_stmt="raise ImportError('no module named _C')",
                     config_torch=torch.__version__, compiled=False, source_tree=True)
    warn, raised, file = import_message(root, extra_path=[installed])
    assert file.startswith(root)
    assert "from its source folder" in warn and "never built in place" in warn
    assert "shadowed by this folder" in warn and os.path.dirname(PACKAGE) in warn
    assert "Rebuild it against this torch" not in warn
    assert raised == warn


def test_installed_copy_without_extension(tmp_path):
    root = make_copy(str(tmp_path), raise_stmt="raise ImportError('no module named _C')",
                     config_torch=torch.__version__, compiled=False)
    warn, _, _ = import_message(root)
    assert "has no compiled extension" in warn and "Reinstall" in warn


def test_built_for_another_torch(tmp_path):
    root = make_copy(str(tmp_path), raise_stmt="raise ImportError('undefined symbol: _ZN3c10xyz')",
                     config_torch="2.0.0+cu118")
    warn, raised, _ = import_message(root)
    assert "built for torch 2.0.0+cu118" in warn and f"this environment has torch {torch.__version__}" in warn
    assert "Rebuild it against this torch" in warn
    assert raised == warn


def test_same_torch_version_another_build(tmp_path):
    root = make_copy(str(tmp_path), raise_stmt="raise ImportError('undefined symbol: _ZN3c10xyz')",
                     config_torch=torch.__version__)
    warn, _, _ = import_message(root)
    assert "another build of it" in warn and "Rebuild it against this torch" not in warn


def test_missing_cuda_runtime(tmp_path):
    root = make_copy(str(tmp_path), raise_stmt=(
        "raise ImportError('libcudart.so.13: cannot open shared object file: No such file or directory')"),
        config_torch=torch.__version__)
    warn, _, _ = import_message(root)
    assert "a CUDA library it needs cannot be found" in warn and "libcudart.so.13" in warn
    assert "PYMATTING_EXT_CUDA=0" in warn


def test_cpu_only_build_asked_for_cuda(monkeypatch):
    monkeypatch.setattr(pymatting_ext._extension, "cuda_kernels", lambda: False)
    with pytest.raises(RuntimeError, match="built without its CUDA kernels.*PYMATTING_EXT_CUDA=1"):
        pymatting_ext._backend.resolve("cuda", torch.device("cuda"))
