"""Running an eval Refiner or MattingRefine as one CUDA graph.

Upstream's refiner cannot be captured: its ``nonzero`` waits on the GPU and
gives data-dependent shapes. Ours in eval ``sampling`` mode (and ``full``)
never synchronises and has shapes fixed by the input size, so a whole
forward can be recorded once and replayed: one launch instead of ~80 (the
coarse network's too, for MattingRefine). ``thresholding`` mode reads the
number of selected cells back, so it cannot be captured.

    graphed = pymatting_ext.cuda_graph(model.eval(), src, bgr)   # warms up, captures
    pha, fgr, *rest = graphed(src2, bgr2)                        # same shapes: a replay

The inputs of each call are copied into the graph's static inputs and the
outputs are the graph's static outputs: valid until the next call (clone
them to keep them). Inputs of another shape, dtype or device raise a
ValueError (capture another graph for another size).
"""
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["cuda_graph", "GraphedModule"]


class GraphedModule:
    """A module's forward captured in a CUDA graph for fixed input shapes
    (see :func:`cuda_graph`)."""

    def __init__(self, module: Callable, inputs: Sequence[Tensor], warmup: int = 3):
        who = "cuda_graph"
        if not inputs or not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError(f"{who}: the example inputs must be tensors, got {[type(t).__name__ for t in inputs]}")
        if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in inputs):
            raise ValueError(f"{who}: CUDA graphs need CUDA tensors, got inputs on "
                             f"{sorted({str(t.device) for t in inputs})}")
        if isinstance(module, nn.Module):
            if module.training:
                raise ValueError(f"{who}: the module must be in eval mode (call .eval()): training mode "
                                 f"synchronises (BatchNorm statistics over the valid patches)")
            for m in module.modules():
                if getattr(m, "mode", None) == "thresholding" and hasattr(m, "threshold"):
                    raise ValueError(f"{who}: a refiner in 'thresholding' mode reads its patch count back "
                                     f"from the GPU, which a CUDA graph cannot; use 'sampling' (or 'full')")
        self.module = module
        self.static_inputs = [t.detach().clone() for t in inputs]
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode():
            # Warm-up on a side stream (kernel compilation, allocator, the
            # folded weights' cache), as torch.cuda.graphs advises.
            side = torch.cuda.Stream(device=inputs[0].device)
            side.wait_stream(torch.cuda.current_stream(inputs[0].device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    module(*self.static_inputs)
            torch.cuda.current_stream(inputs[0].device).wait_stream(side)
            with torch.cuda.graph(self.graph):
                self.static_outputs = module(*self.static_inputs)

    def __call__(self, *inputs: Tensor) -> Tuple[Tensor, ...]:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"cuda_graph: expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for i, (t, s) in enumerate(zip(inputs, self.static_inputs)):
            if not isinstance(t, Tensor) or t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
                got = (tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"cuda_graph: input {i} must be {tuple(s.shape)} {s.dtype} on {s.device} as "
                                 f"captured, got {got}; capture another graph for another size")
            s.copy_(t)
        self.graph.replay()
        return self.static_outputs


def cuda_graph(module: Callable, *inputs: Tensor, warmup: int = 3) -> GraphedModule:
    """``module`` (an eval Refiner, MattingRefine or any module built on
    them that does not synchronise) captured in a CUDA graph for inputs shaped
    like ``inputs``; see the module docstring."""
    return GraphedModule(module, inputs, warmup)
