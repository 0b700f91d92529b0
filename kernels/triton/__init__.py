"""Triton kernels of pymatting_ext's op set (installed as
``pymatting_ext.triton_kernels``).

Each module holds the ``@triton.jit`` kernels of one op and a launcher that
takes torch tensors, allocates the outputs and launches on the tensors'
device (made current for the launch). The launchers call
``common.wrap_triton``, which goes through ``torch.library.wrap_triton`` only
while an op registered from them in ``pymatting_ext._triton`` is traced by
torch.compile, and launches the kernels directly otherwise.

Integer size arguments are not specialised (``do_not_specialize``), so one
compiled variant per kernel and dtype serves every frame size;
``pymatting_ext.warmup`` compiles the ones the Refiner uses ahead of the
first frame (``compiled_variants`` counts them). Nor do the
launchers need concrete sizes: the resize scale is computed in the kernels
(``common.resize_scale``), so under ``torch.compile(dynamic=True)`` a new
frame size reuses the graph. Every launch pins Triton's ``enable_fp_fusion``
to ``common.FP_FUSION`` (False: the GPU rounds as the interpreter does).

Under ``TRITON_INTERPRET=1`` (set before this package is imported) the same
kernels run on CPU tensors through Triton's interpreter: that is how CI
tests them without a GPU.
"""
from .common import compiled
from .select import select_sampling, select_thresholding
from .crop import crop, crop_into
from .compose import compose, compose_into, replace
from .variants import compiled_variants

__all__ = ["select_sampling", "select_thresholding", "crop", "crop_into", "replace", "compose", "compose_into",
           "compiled", "compiled_variants"]
