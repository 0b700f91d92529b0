"""Triton kernels of pymatting_ext's op set (installed as
``pymatting_ext.triton_kernels``).

Each module holds the ``@triton.jit`` kernels of one op and a launcher that
takes torch tensors, allocates the outputs and launches on the tensors'
device. The launchers go through ``wrap`` (``torch.library.wrap_triton`` when
the installed torch has it) so that the ops registered from them in
``pymatting_ext._triton`` can be traced by torch.compile.

Under ``TRITON_INTERPRET=1`` (set before this package is imported) the same
kernels run on CPU tensors through Triton's interpreter: that is how CI
tests them without a GPU.
"""
from .common import compiled
from .select import select_sampling, select_thresholding
from .crop import crop
from .compose import compose, replace

__all__ = ["select_sampling", "select_thresholding", "crop", "replace", "compose", "compiled"]
