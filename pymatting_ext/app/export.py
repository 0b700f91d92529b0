"""Exports of MattingRefine / MattingBase for running without this package's
Python code (upstream's export_torchscript.py and export_onnx.py, and an
AOTInductor package).

- ``torchscript``: ``torch.jit.script`` of the model, saved. The scripted
  model calls pymatting_ext's C++ ops; loading it needs the extension loaded
  (``import pymatting_ext``, or in C++ a dlopen of
  ``pymatting_ext.library_path()``, as tests/cpp/run_scripted.cpp). torch
  deprecates TorchScript in favour of torch.export; it still works.
- ``aoti``: ``torch.export`` of the model with pymatting_ext's custom ops in
  its graph, compiled ahead of time by AOTInductor into a ``.pt2`` package.
  Python loads it with ``torch._inductor.aoti_load_package``; C++ (libtorch,
  no Python) with ``torch::inductor::AOTIModelPackageLoader`` after a dlopen
  of the extension, as tests/cpp/run_aoti.cpp. Shapes are those of the
  example input (batch and resolution) unless ``dynamic``.
- ``onnx``: the model with the refiner's ops written in standard ONNX
  operators: the refiner runs on the reference backend (plain PyTorch:
  sort/TopK, gathers, scatter, Resize) and torch's ONNX exporter (torch.export
  based) translates it. Batch, height and width are dynamic axes by default,
  as in upstream's exporter. Every refine mode exports; in 'thresholding'
  the number of refined patches depends on the data (a data-dependent size
  in the graph, zero patches included).

Each export is checked by default: the exported model is run on the example
input (and, where dynamic, on a second size) and compared with the eager
model; ONNX with onnxruntime.
"""
import contextlib
import io
import math
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .common import UserError, require

__all__ = ["export_torchscript", "export_aoti", "export_onnx", "FORMATS"]

FORMATS = ("torchscript", "aoti", "onnx")

#: Largest allowed difference from the eager model when checking an export
#: (upstream's export_onnx.py validates with 0.005; the backbones' fused and
#: reordered arithmetic moves fp32 results by ~1e-6).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _output_names(model) -> List[str]:
    if hasattr(model, "refiner"):
        return ["pha", "fgr", "pha_sm", "fgr_sm", "err_sm", "ref_sm"]
    return ["pha", "fgr", "err", "hid"]


def example_inputs(model: torch.nn.Module, width: int, height: int, batch: int,
                   seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    param = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(batch, 3, height, width, generator=g).to(param.device, param.dtype)
    bgr = torch.rand(batch, 3, height, width, generator=g).to(param.device, param.dtype)
    return src, bgr


def min_dynamic_side(model: torch.nn.Module) -> int:
    """The smallest height and width a model exported with dynamic sizes
    serves: the coarse network's deepest feature map (stride 16) at least 2
    wide, since torch.export fixes any size that is 1 in its example or
    check (broadcasting). A multiple of 4."""
    coarse = math.ceil(17 / float(getattr(model, "backbone_scale", 1.0)))
    return 4 * math.ceil(coarse / 4)


def _second_size(width: int, height: int, batch: int, min_side: int = 8) -> Tuple[int, int, int]:
    """Another valid input size for checking a dynamic export: about half the
    example's (or, where that is under min_side, a little larger)."""
    def other(side: int, step: int) -> int:
        half = max(side // 2 // 4 * 4 + step, 8)
        return half if half >= min_side else side + step

    return other(width, 8), other(height, 4), 1 if batch > 1 else 2


def compare(names: Sequence[str], want: Sequence[torch.Tensor], got: Sequence) -> Dict[str, float]:
    """max |want - got| per output name (inf for a shape mismatch)."""
    diffs = {}
    for name, w, g in zip(names, want, got):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(w.shape):
            diffs[name] = float("inf")
        else:
            diffs[name] = float((w.detach().double().cpu() - g.double().cpu()).abs().max()) if w.numel() else 0.0
    return diffs


def _check(diffs: Dict[str, float], dtype: torch.dtype, what: str) -> None:
    tol = TOLERANCE.get(dtype, 1e-4)
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    if bad:
        raise UserError(f"{what} differs from the eager model: " +
                        ", ".join(f"{k} by {v:.3g}" for k, v in bad.items()) + f" (tolerance {tol:g})")


# -- TorchScript -----------------------------------------------------------------

def export_torchscript(model: torch.nn.Module, path: str, *, example: Tuple[torch.Tensor, torch.Tensor],
                       validate: bool = True) -> dict:
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 deprecates torch.jit
        scripted = torch.jit.script(model)
        scripted.save(path)
    result = {"format": "torchscript", "path": path}
    if validate:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(path, map_location=example[0].device)
        with torch.inference_mode():
            diffs = compare(_output_names(model), model(*example), loaded(*example))
        _check(diffs, example[0].dtype, "the scripted model")
        result["max_abs_diff"] = {f"{tuple(example[0].shape)}": diffs}
    return result


# -- torch.export + AOTInductor ------------------------------------------------------

def _dynamic_shapes(dynamic: bool, min_side: int, max_side: int = 8192):
    if not dynamic:
        return None
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    # NB: height and width are multiples of 4 (the refiner's quarter grid).
    height = 4 * Dim("height_4", min=min_side // 4, max=max_side // 4)
    width = 4 * Dim("width_4", min=min_side // 4, max=max_side // 4)
    spec = {0: batch, 2: height, 3: width}
    return (spec, spec)


def export_program(model: torch.nn.Module, example: Tuple[torch.Tensor, torch.Tensor], dynamic: bool = False):
    """torch.export of the model (eval, no grad) with pymatting_ext's custom
    ops left in the graph; raises UserError if it cannot be exported."""
    model = model.eval()
    side = min_dynamic_side(model)
    if dynamic and min(example[0].shape[2:]) < side:
        raise UserError(f"an export with dynamic sizes needs an example of at least {side}x{side} for this "
                        f"model (its coarse network's deepest feature map must be wider than 1); got "
                        f"{example[0].shape[3]}x{example[0].shape[2]}")
    try:
        with torch.no_grad():
            return torch.export.export(model, example, dynamic_shapes=_dynamic_shapes(dynamic, side),
                                       strict=False)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
        raise UserError(f"torch.export failed{' with dynamic shapes' if dynamic else ''}: "
                        f"{_summary(exc)}") from None


def _summary(exc: BaseException) -> str:
    text = str(exc).strip()
    for marker in ("Exception summary", "Could not guard", "Guard failed"):
        if marker in text:
            tail = text[text.index(marker):].splitlines()
            text = " ".join(line.strip() for line in tail[:4] if line.strip() and not line.startswith("#"))
            break
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:400]


def _second_example(model: torch.nn.Module, example: Tuple[torch.Tensor, torch.Tensor]):
    """Inputs of another valid size than example's, for a dynamic export."""
    w, h, b = _second_size(example[0].shape[3], example[0].shape[2], example[0].shape[0], min_dynamic_side(model))
    return example_inputs(model, w, h, b, seed=1)


def _validate(model: torch.nn.Module, names: List[str], example, other, run: Callable, fails: str,
              checked: str) -> dict:
    """The export (run) against the eager model on example and, where not
    None, other: {shape: {output: max |diff|}}; a UserError where it does
    not run ("<fails> at <shape>: ...") or does not match."""
    diffs_by_shape = {}
    for src, bgr in [example] + ([other] if other is not None else []):
        with torch.inference_mode():
            want = model(src, bgr)
        try:
            got = run(src, bgr)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{fails} at {tuple(src.shape)}: {_summary(exc)}") from None
        diffs = compare(names, want, got)
        _check(diffs, src.dtype, f"{checked} at {tuple(src.shape)}")
        diffs_by_shape[f"{tuple(src.shape)}"] = diffs
    return diffs_by_shape


def export_aoti(model: torch.nn.Module, path: str, *, example: Tuple[torch.Tensor, torch.Tensor],
                dynamic: bool = False, validate: bool = True, inductor_configs: Optional[dict] = None) -> dict:
    """An AOTInductor package (.pt2) of the model, its custom ops called
    through the dispatcher (the package needs pymatting_ext's extension
    loaded where it runs)."""
    if not path.endswith(".pt2"):
        raise UserError(f"an AOTInductor package must end in .pt2, got {path!r}")
    names = _output_names(model)
    program = export_program(model, example, dynamic)
    other = _second_example(model, example) if dynamic else None
    if other is not None:
        # Before minutes of compiling: does the program run at another size,
        # or did tracing specialise one (its guards fail)?
        try:
            with torch.no_grad():
                program.module()(*other)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"the model exported with dynamic shapes does not run at {tuple(other[0].shape)}: "
                            f"tracing specialised a size ({_summary(exc)}); export for a fixed size "
                            f"(--no-dynamic, --resolution W H --batch-size N) instead") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(program, package_path=path,
                                                     inductor_configs=dict(inductor_configs or {}))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"AOTInductor could not compile the model: {_summary(exc)}") from None
    result = {"format": "aoti", "path": path, "dynamic": dynamic}
    if validate:
        loaded = torch._inductor.aoti_load_package(path)
        result["max_abs_diff"] = _validate(model, names, example, other, loaded,
                                           "the AOTInductor package does not run", "the AOTInductor package")
    return result


# -- ONNX ---------------------------------------------------------------------------

def _onnx_translations():
    """ONNX for the two aten ops of the reference path that torch's exporter
    does not translate: a stable descending sort (select_sampling's top-k;
    ONNX TopK breaks ties by the lower index, as a stable sort) and the
    remainder by a symbolic size (row-major index arithmetic)."""
    require("onnxscript", "--format onnx")
    from onnxscript import opset18 as op

    def sort_stable(self, stable=None, dim=-1, descending=False):
        n = op.Shape(self, start=dim, end=dim + 1) if dim != -1 else op.Shape(self, start=-1)
        return op.TopK(self, n, axis=dim, largest=descending, sorted=True)

    def remainder_scalar(self, other):
        return op.Mod(self, op.CastLike(other, self), fmod=0)

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.remainder.Scalar: remainder_scalar}


@contextlib.contextmanager
def _reference_refiner(model):
    """The refiner on the reference backend (plain PyTorch, standard ONNX
    operators) for the duration."""
    refiner = getattr(model, "refiner", None)
    saved = getattr(refiner, "backend", None)
    if refiner is not None and saved is not None:
        refiner.backend = "reference"
    try:
        yield
    finally:
        if refiner is not None and saved is not None:
            refiner.backend = saved


def export_onnx(model: torch.nn.Module, path: str, *, example: Tuple[torch.Tensor, torch.Tensor],
                opset: int = 18, dynamic: bool = True, validate: bool = True, verbose: bool = False) -> dict:
    """The model as ONNX (see the module), checked with onnxruntime against
    the eager model (on pymatting_ext's default backend)."""
    require("onnx", "--format onnx")
    if model.__class__.__module__.split(".")[0] != "pymatting_ext":
        raise UserError("the ONNX export takes pymatting_ext's MattingRefine/MattingBase")
    if opset < 18:
        # torch's exporter writes opset 18 and converts down, which fails for
        # this model's Resize/Split nodes: ask for what it can do.
        raise UserError(f"--opset {opset}: torch {torch.__version__.split('+')[0]}'s ONNX exporter writes opset 18 "
                        f"or newer for this model; use --opset 18 (onnxruntime 1.14+ runs it)")
    model = model.eval()
    names_in, names_out = ["src", "bgr"], _output_names(model)
    dynamic_axes = {name: {0: "batch", 2: "height", 3: "width"} for name in names_in + names_out} if dynamic else None
    # NB: torch's exporter prints its progress; kept for --verbose.
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    started = time.perf_counter()
    try:
        with _reference_refiner(model), warnings.catch_warnings(), quiet:
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, path, input_names=names_in, output_names=names_out,
                              opset_version=opset, dynamo=True, dynamic_axes=dynamic_axes, external_data=False,
                              custom_translation_table=_onnx_translations(), verbose=verbose)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"the ONNX export failed: {_summary(exc)}") from None
    result = {"format": "onnx", "path": path, "opset": opset, "dynamic": dynamic,
              "export_seconds": time.perf_counter() - started}
    if validate:
        ort = require("onnxruntime", "checking the ONNX export (--no-validate skips it)")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        run = lambda src, bgr: session.run(None, {"src": src.cpu().numpy(), "bgr": bgr.cpu().numpy()})
        result["max_abs_diff"] = _validate(model, names_out, example,
                                           _second_example(model, example) if dynamic else None, run,
                                           "onnxruntime cannot run the exported model", "onnxruntime's result")
    return result
