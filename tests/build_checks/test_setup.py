"""setup.py's reuse of an installed extension: the hash of the extension's
inputs, where an installed copy is looked for, and when it is reused
(tests/install.sh relies on it so that tests/run.sh and benchmarks/run.sh
compile once between them). setup.py is loaded from the checkout as a
module; nothing is built."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

import pymatting_ext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = os.path.join(ROOT, "setup.py")
if not os.path.isfile(SETUP):
    pytest.skip("needs the checkout's setup.py", allow_module_level=True)

SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


@pytest.fixture
def setup_py(monkeypatch, tmp_path):
    """setup.py as a module whose ROOT is a copy of the checkout's csrc/
    under tmp_path (so that sources can be changed)."""
    spec = importlib.util.spec_from_file_location("pymatting_ext_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "csrc"), root / "csrc")
    (root / "pymatting_ext").mkdir()
    monkeypatch.setattr(module, "ROOT", str(root))
    return module


def fake_install(folder, ext_hash, library=None):
    """A pymatting_ext package in folder with a recorded hash and a _C."""
    package = folder / "pymatting_ext"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_build_config.py").write_text(f"BUILD_CONFIG = {{'ext_hash': {ext_hash!r}}}\n")
    target = package / ("_C" + SUFFIX)
    if library is None:
        target.write_bytes(b"not a library")
    else:
        shutil.copy2(library, target)
    return str(target)


def test_hash_follows_sources_headers_and_settings(setup_py):
    sources = ["csrc/ops.cpp"]
    settings = {"flags": ["-O3"]}
    first = setup_py.extension_hash(sources, False, settings)
    assert setup_py.extension_hash(sources, False, dict(settings)) == first
    assert setup_py.extension_hash(sources, False, {"flags": ["-O2"]}) != first
    header = os.path.join(setup_py.ROOT, "csrc", "index_math.h")
    with open(header, "a") as f:
        f.write("\n// changed\n")
    assert setup_py.extension_hash(sources, False, settings) != first


def test_an_environment_inside_the_checkout_is_found(setup_py, tmp_path, monkeypatch):
    # ./venv/.../site-packages inside the checkout: its copy counts; the
    # checkout's own source folder never does.
    site = tmp_path / "checkout" / "venv" / "site"
    library = fake_install(site, "abc")
    monkeypatch.setattr(sys, "path", [setup_py.ROOT, str(site)] + sys.path)
    found, config = setup_py.installed_extension()
    assert found == library and config == {"ext_hash": "abc"}


def test_the_source_folder_alone_is_not_an_installed_copy(setup_py, monkeypatch):
    package = os.path.join(setup_py.ROOT, "pymatting_ext")
    with open(os.path.join(package, "__init__.py"), "w"):
        pass
    with open(os.path.join(package, "_build_config.py"), "w") as f:
        f.write("BUILD_CONFIG = {'ext_hash': 'abc'}\n")
    # An editable install puts the checkout itself on the path.
    monkeypatch.setattr(sys, "path", [setup_py.ROOT, os.path.dirname(setup_py.ROOT)])
    assert setup_py.installed_extension() == (None, None)


def test_reused_only_when_the_hash_matches_and_it_loads(setup_py, tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    library = fake_install(site, "abc")
    monkeypatch.setattr(sys, "path", [str(site)] + sys.path)
    assert setup_py.reusable_extension("other") is None
    assert "built from other sources" in capsys.readouterr().out
    # The right hash, but the file does not load: compiled again.
    assert setup_py.reusable_extension("abc") is None
    assert "does not load" in capsys.readouterr().out
    monkeypatch.setenv("PYMATTING_EXT_REUSE", "0")
    assert setup_py.reusable_extension("abc") is None
    assert "PYMATTING_EXT_REUSE=0" in capsys.readouterr().out


def test_a_loadable_build_of_the_same_hash_is_reused(tmp_path):
    if not pymatting_ext.build_info()["loaded"]:
        pytest.skip("the compiled extension is not loaded")
    from pymatting_ext import _C

    site = tmp_path / "site"
    library = fake_install(site, "abc", library=_C.__file__)
    # NB: in a process of its own: loading a second copy of the extension
    # here would register its ops twice.
    script = (f"import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('s', {SETUP!r})\n"
              f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
              f"sys.path.insert(0, {str(site)!r})\n"
              f"print('RESULT', m.reusable_extension('abc'))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "reusing the installed build" in proc.stdout
    assert f"RESULT {library}" in proc.stdout
