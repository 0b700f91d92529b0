"""The package under test is the built one: the compiled extension loaded,
and the CUDA sources compiled in where the build was asked to include them."""
import os

import pytest
import torch

import pymatting_ext


def test_extension_is_loaded():
    info = pymatting_ext.build_info()
    assert info["loaded"], info["load_error"]
    assert info["compiled"] in ("cpu", "cpu+cuda")


def test_installed_package_is_used():
    # tests/run.sh runs pytest from tests/, so the source folder must not
    # shadow the installed package (whose _C sits beside it).
    assert os.path.isdir(os.path.dirname(pymatting_ext.__file__))
    assert any(f.startswith("_C") for f in os.listdir(os.path.dirname(pymatting_ext.__file__)))


def test_cuda_sources_built_when_required():
    info = pymatting_ext.build_info()
    if os.environ.get("PYMATTING_EXT_CUDA") == "1":
        assert info["with_cuda"] and info["compiled"] == "cpu+cuda", info
        assert info["cuda"].startswith("cudart "), info
    if info.get("with_cuda"):
        assert torch.version.cuda is not None


def test_every_op_has_a_schema():
    for name in ("select_sampling", "select_thresholding", "crop", "replace", "compose"):
        assert hasattr(torch.ops.pymatting_ext, name), name


def test_every_op_has_its_kernels():
    ops = ("select_sampling", "select_thresholding", "crop", "replace", "compose")
    cuda = pymatting_ext.build_info()["compiled"] == "cpu+cuda"
    for name in ops:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pymatting_ext::{name}", "CPU"), name
        # Built with its CUDA sources, every op has its CUDA kernel (a GPU is
        # not needed to see the registration).
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pymatting_ext::{name}", "CUDA") == cuda, name


def test_triton_kernels_are_installed_with_the_package():
    pytest.importorskip("triton")
    import pymatting_ext.triton_kernels as kernels

    # pymatting_ext/triton_kernels when installed; kernels/triton in an
    # editable install.
    assert os.path.basename(os.path.dirname(kernels.__file__)) in ("triton_kernels", "triton")
    assert pymatting_ext._backend.triton_status() == (True, "")


def test_asking_for_tritons_status_loads_nothing():
    # A status query has no side effect: the Triton ops are defined and
    # registered on the first use of backend='triton', not by asking.
    import subprocess
    import sys

    from helpers import subprocess_env
    code = ("import sys, pymatting_ext; from pymatting_ext import _backend; "
            "ok, why = _backend.triton_status(); "
            "print(ok, 'pymatting_ext._triton' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=subprocess_env()).stdout.split()
    assert out[1:] == ["False", "False"], out
