"""How the Refiner runs a call in eager Python, decided in one place: the
fused patch kernel, neighbouring cells merged into tiles (CPU), patches in
chunks of bounded memory (with the free-memory probe behind the default),
and the output buffer reused across calls (with reuse_output, or on the CPU
where nothing holds the last one any more). None of it changes the results;
TorchScript never reaches it (the Refiner calls it only outside scripting).

RunPlan is a mixin of Refiner: its tuning knobs are class attributes that
an instance may override, and its methods read the Refiner's settings
(max_patches, fused, merge_cells, reuse_output, kernel_size)."""
import os
import time
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ._tiles import plan_tiles, tile_cost

__all__ = ["RunPlan", "free_memory", "capturing", "promote_under_autocast"]


def promote_under_autocast(*tensors: Tensor) -> List[Tensor]:
    """Under autocast the coarse maps may come in a lower precision than src:
    the ops take one dtype, the widest. (Otherwise unchanged, and mixed
    dtypes are an error.)"""
    if not all(isinstance(t, Tensor) for t in tensors) or not torch.is_autocast_enabled(tensors[0].device.type):
        return list(tensors)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_free_cache: Dict[str, Tuple[float, int]] = {}


def free_memory(device: torch.device) -> int:
    """Free bytes on `device`: the driver's free memory plus what PyTorch's
    caching allocator holds unused (CUDA), or the memory the OS has
    available (CPU). Re-read at most every second (and never during CUDA
    graph capture, where the last reading serves)."""
    key = str(device)
    now = time.monotonic()
    cached = _free_cache.get(key)
    if cached is not None and (now - cached[0] < 1.0 or capturing(device)):
        return cached[1]
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 8 << 30
    _free_cache[key] = (now, int(free))
    return int(free)


def _needs_grad(tensors: List[Optional[Tensor]]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


#: Refiner -> its last CPU output (see RunPlan._unused_output). Beside the
#: Refiner rather than in it, so that copying or pickling one never carries it.
_last_outputs: "weakref.WeakKeyDictionary[torch.nn.Module, Tensor]" = weakref.WeakKeyDictionary()
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class RunPlan:
    """The Refiner's run strategies (see the module docstring)."""

    #: Tile sides (in cells) that merge_cells may use, each dividing the next.
    merge_tile_sizes = (2, 4, 8)
    #: The least saving, in single cells' cost, for which a tile side gets a
    #: pass of its own (a pass costs a crop and four convolution calls).
    merge_min_saving_cells = 32
    #: The least fraction of the cost a tile must save to be taken: the cost
    #: model is good to about that (a pair of cells in a 2 x 2 tile, 2.5% by
    #: the model, measured a loss).
    merge_min_gain = 0.1
    #: Patches per chunk on the CPU in eval mode. NB: measured on 2 cores
    #: (AMD EPYC) with uniform random err, 1536 beat 512 by 8% at HD and 20%
    #: at 4K (fewer calls, each with its serial part), and tied with boundary
    #: err. A chunk's crop (16.5 MB at kernel_size 3) is streamed to memory
    #: by the crop kernel (see crop_kernel.cpp).
    cpu_chunk_patches = 1536
    #: The most memory the patches of one chunk may take by default (bytes):
    #: a quarter of the free device memory, at most this.
    chunk_budget_bytes = 1 << 30
    #: Elements of intermediates per patch, all stages together (crop 42x8x8,
    #: conv1 24x6x6, conv2, conv3's input 22x8x8 and output, the result),
    #: rounded up for allocator slack: the estimate behind the default chunk.
    _elements_per_patch = 8192

    def _fused_ok(self, backend: str, folded: List[Tensor], images: List[Tensor]) -> bool:
        """Whether the sparse modes run the fused patch kernel
        (pymatting_ext._fused): eval mode (folded weights) without autograd,
        on the Triton backend; with fused=None only where Triton compiles
        for a GPU, with fused=True under its interpreter too (CI's way of
        testing it), never with fused=False."""
        fused = getattr(self, "fused", None)
        if fused is False or len(folded) == 0:
            return False
        if _needs_grad(images + folded):
            if fused:
                raise ValueError("Refiner: fused=True runs without autograd (eval inference); call it under "
                                 "torch.no_grad() or torch.inference_mode(), or set fused=None")
            return False
        if backend != "triton":
            if fused:
                raise ValueError(f"Refiner: fused=True needs backend='triton', but the backend is {backend!r}")
            return False
        if folded[0].dtype != images[0].dtype:  # under autocast
            return False
        return bool(fused) or images[0].device.type == "cuda"

    def _merge_ok(self, backend: str, folded: List[Tensor], images: List[Tensor]) -> bool:
        """Whether the sparse modes may compute neighbouring cells together
        (merge_cells): eval mode without autograd, on the CPU, with the C++
        kernels or the reference, and not while torch.compile traces (the
        plan depends on the data). Never on a GPU: planning reads idx on the
        host, and eval sampling there never waits on the device."""
        if not getattr(self, "merge_cells", True) or len(folded) == 0 or torch.compiler.is_compiling():
            return False
        if images[0].device.type != "cpu" or backend not in ("cpu", "reference"):
            return False
        return not _needs_grad(images + folded)

    def _chunk_size(self, backend: str, folded: bool, like: Optional[Tensor] = None) -> Optional[int]:
        """Patches per chunk in eval mode, or None for one chunk.

        max_patches when set; else on the C++ CPU kernels cpu_chunk_patches
        (the intermediates then stay in cache and in malloc's heap instead of
        ~100 MB of fresh pages a frame); else as many patches as fit in
        chunk_budget_bytes or a quarter of the free memory of `like`'s device,
        whichever is less. Training is never chunked: BatchNorm's batch
        statistics need every patch at once. Neither is a torch.compile trace
        (the patch count may be symbolic) unless max_patches asks for it."""
        if not folded:
            return None
        if self.max_patches is not None:
            return self.max_patches
        if torch.compiler.is_compiling():
            return None
        if backend == "cpu":
            return self.cpu_chunk_patches
        if like is None:
            return None
        budget = min(self.chunk_budget_bytes, free_memory(like.device) // 4)
        return max(256, budget // (self._elements_per_patch * like.element_size()))

    def _planned_patches(self, backend: str, idx: Tensor, valid: Optional[Tensor], images: List[Tensor],
                         folded: List[Tensor]) -> Tuple[Tensor, Optional[Tensor], Tensor]:
        """(idx, valid, patches): the refined patches of the cells idx names,
        merged into tiles or in chunks as planned above; merging returns the
        valid cells only, in an order of its own (compose does not mind)."""
        chunk = self._chunk_size(backend, len(folded) > 0, images[0])
        if self._merge_ok(backend, folded, images):
            idx, x = self._merged_patches(backend, idx, valid, images, folded, chunk)
            return idx, None, x
        if chunk is None or idx.shape[0] <= chunk:
            return idx, valid, self._patches(backend, idx, *images, folded)
        # NB: in eval mode every patch is computed independently, so they run
        # in chunks of bounded memory. P is known on the host: no
        # synchronisation.
        parts = [self._patches(backend, idx[i:i + chunk], *images, folded) for i in range(0, idx.shape[0], chunk)]
        return idx, valid, torch.cat(parts)

    def _merge_costs(self, folded: List[Tensor]) -> Dict[int, float]:
        """{tile side: cost} for plan_tiles; 1 is a single cell."""
        return {t: float(tile_cost(folded, self.kernel_size, t)) for t in (1,) + tuple(self.merge_tile_sizes)}

    def _merged_patches(self, backend: str, idx: Tensor, valid: Optional[Tensor], images: List[Tensor],
                        folded: List[Tensor], chunk: Optional[int]) -> Tuple[Tensor, Tensor]:
        """The refined patches of the valid cells of idx, with tiles of
        neighbouring cells computed together where plan_tiles finds that
        cheaper. Returns (idx', patches): those cells in an order of its own
        (each cell once, so compose does not mind the order)."""
        if valid is not None:
            idx = idx[valid]
        src = images[0]
        B, H, W = src.shape[0], src.shape[2], src.shape[3]
        costs = self._merge_costs(folded)
        single, tiles = plan_tiles(idx, B, H // 4, W // 4, costs, self.merge_tile_sizes,
                                   self.merge_min_saving_cells * costs[1], self.merge_min_gain)
        rows: List[Tensor] = []
        parts: List[Tensor] = []
        if single.shape[0] > 0:
            cells = idx if single.shape[0] == idx.shape[0] else idx[single]
            rows.append(cells)
            step = cells.shape[0] if chunk is None else chunk
            for i in range(0, cells.shape[0], step):
                parts.append(self._patches(backend, cells[i:i + step], *images, folded))
        for T, tile_idx, in_tiles, where in tiles:
            # The cells by tile, so that each chunk of tiles gives the next run.
            where, order = torch.sort(where, stable=True)
            cells = idx[in_tiles[order]]
            rows.append(cells)
            ly, lx = cells[:, 1] % T, cells[:, 2] % T
            # NB: conv3's input, the largest intermediate, sets a tile's memory
            # against a cell's (8 x 8 a cell at kernel_size 3; a tile of 8 x 8
            # cells ~20 cells, not 64), and so the tiles a chunk.
            q = 2 if self.kernel_size == 3 else 0
            per_tile = -(-(4 * T + 2 * q) ** 2 // (4 + 2 * q) ** 2)
            step = tile_idx.shape[0] if chunk is None else max(1, chunk // per_tile)
            bounds = torch.searchsorted(where, torch.arange(0, tile_idx.shape[0] + step, step)).tolist()
            for j, i in enumerate(range(0, tile_idx.shape[0], step)):
                out = self._patches(backend, tile_idx[i:i + step], *images, folded, T)
                n, C = out.shape[0], out.shape[1]
                # (n, C, 4T, 4T) as (n, T, 4, T, 4, C): each cell's 4 x 4 block.
                blocks = out.permute(0, 2, 3, 1).reshape(n, T, 4, T, 4, C)
                r = slice(bounds[j], bounds[j + 1])
                parts.append(blocks[where[r] - i, ly[r], :, lx[r]].permute(0, 3, 1, 2))  # (R, C, 4, 4)
        if not parts:
            return idx, src.new_empty([0, 4, 4, 4])
        return torch.cat(rows), torch.cat(parts)

    def _output_to_reuse(self, coarse: Tensor, patches: Tensor, src: Optional[Tensor], H: int,
                         W: int) -> Optional[Tensor]:
        """With reuse_output, the (B, C, H, W) buffer that compose writes
        into: the previous call's where shape, dtype and device match, else
        a new one kept for the next call. None where a new output is due
        (see Refiner's docstring): reuse off, autograd, a torch.compile
        trace, a CUDA graph capture."""
        if torch.compiler.is_compiling() or capturing(coarse.device) or _needs_grad([coarse, patches, src]):
            return None
        shape = (coarse.shape[0], coarse.shape[1], H, W)
        if not getattr(self, "reuse_output", False):
            return self._unused_output(coarse, shape)
        kept = self.__dict__.get("_kept_output")
        if kept is None or tuple(kept.shape) != shape or kept.dtype != coarse.dtype or kept.device != coarse.device:
            # NB: a plain tensor (not an inference tensor), so that calls in
            # and out of inference_mode can all write it.
            with torch.inference_mode(False):
                kept = torch.empty(shape, dtype=coarse.dtype, device=coarse.device)
            self.__dict__["_kept_output"] = kept
        return kept

    def _unused_output(self, coarse: Tensor, shape: Tuple[int, ...]) -> Optional[Tensor]:
        """Without reuse_output, on the CPU in eval mode: the last call's
        output where nothing outside the Refiner holds it any more (no view
        of it, no array on its memory), so that writing it again cannot be
        seen; else None (a new output is due). Its memory would otherwise go
        back to the OS (malloc maps buffers over 32 MiB afresh: a 4K output
        is ~133 MB) and the new one pay a page fault per 4 KiB, ~30 ms a call
        at 4K."""
        if coarse.device.type != "cpu" or self.training or _storage_use_count is None:
            return None
        last = _last_outputs.pop(self, None)  # (atomic: one call at a time gets it)
        if last is None or tuple(last.shape) != shape or last.dtype != coarse.dtype:
            return None
        if last.is_inference() != torch.is_inference_mode_enabled():
            return None  # (the outputs of a call are inference tensors exactly in inference mode)
        # `last` is a tensor of its own on that memory which no one else can
        # reach (see _remember_output): the memory's users are `last` and the
        # storage object made to ask, or there are others.
        if _storage_use_count(last.untyped_storage()._cdata) != 2:
            return None
        return last

    def _remember_output(self, out: Tensor) -> None:
        """Keeps a new CPU output for _unused_output (eval inference, without
        reuse_output), else forgets the last one. Called once the views to
        return are made (so that a call in another thread sees them); keeps
        a tensor of its own on the memory, which is neither returned nor the
        base of anything returned."""
        if torch.compiler.is_compiling():
            return  # (module state a compiled graph would have to guard on)
        if (out.device.type == "cpu" and not self.training and not out.requires_grad
                and not getattr(self, "reuse_output", False)):
            _last_outputs[self] = out.detach()
        else:
            _last_outputs.pop(self, None)  # (nothing kept alive for calls that will not use it)
