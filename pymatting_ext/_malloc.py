"""glibc malloc's thresholds for CPU inference.

A frame's intermediate tensors (the coarse network's activations, the
refiner's patches) are freed at the end of each call. glibc gives the top of
its heap back to the system once more than its trim threshold is free there
(by default twice its dynamic mmap threshold, at most 64 MiB), and the next
frame then faults the same memory back in, page by page: measured on a
2-core EPYC with mobilenetv2 at HD, ~19,000 page faults a frame in 4 of 6
processes, and 197 against 161 ms a frame when the heap is kept (4K: 217
against 183 ms; in one process, trimming and keeping in turn). Whether a process trims depends on how its heap
happens to be laid out, so the speed of the same call varied by that much
from one process to the next.

keep_heap() fixes the two thresholds once per process: allocations up to
32 MiB come from the heap (the ceiling glibc's own dynamic threshold
reaches), and the heap is trimmed only past 1 GiB free at its top. The heap
then stays at the size of the largest frame's working set instead of
shrinking after each frame; the peak memory is that working set either way.
The model calls it when it builds its CPU plan (_coarse.coarse_plan), that
is, for eval inference on the CPU.

It leaves malloc alone where the process is not on glibc, where the
environment already tunes malloc (MALLOC_*_ variables, GLIBC_TUNABLES with
malloc settings, or another allocator in LD_PRELOAD), and where
PYMATTING_EXT_MALLOC=0.
"""
import ctypes
import os
import sys
import threading

__all__ = ["keep_heap", "ENV_VAR", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

#: Environment variable: 0 leaves malloc's thresholds alone.
ENV_VAR = "PYMATTING_EXT_MALLOC"
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_state = None  # None: not tried yet; then True (set) or a str (why not)


def _why_not() -> str:
    """Why the thresholds must be left alone, or '' where they may be set."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return f"{ENV_VAR}=0"
    if not sys.platform.startswith("linux"):
        return "not Linux"
    tuned = [k for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                         "MALLOC_ARENA_MAX") if k in os.environ]
    if tuned:
        return f"the environment sets {tuned[0]}"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc's"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded"
    return ""


def keep_heap() -> bool:
    """Sets glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB,
    once per process, where it applies (see the module docstring). True if
    they are set (by this call or an earlier one)."""
    global _state
    if _state is not None:
        return _state is True
    with _lock:
        if _state is None:
            _state = _why_not() or _set()
    return _state is True


def _set():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # (glibc only: musl has mallopt but not this)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # (The mmap threshold first: setting either turns off glibc's dynamic
    # one, which would otherwise mmap every tensor over 128 KiB afresh.)
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "mallopt refused"
    return True


def state():
    """True if keep_heap() set the thresholds, a str saying why not, or None
    before it ran."""
    return _state
