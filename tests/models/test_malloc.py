"""glibc malloc's thresholds for CPU inference (pymatting_ext._malloc): with
them, a frame's tensors up to 32 MiB come from the heap and the heap is not
given back between frames; the model sets them when it builds its CPU plan,
leaves malloc alone where told to or already tuned, and a long run of frames
keeps the memory flat. Each case runs in a fresh process, as the thresholds
are the process's; the heap is read with glibc's mallinfo2."""
import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from pymatting_ext import _malloc


def _has_mallinfo2():
    try:
        ctypes.CDLL(None).mallinfo2  # (glibc 2.33 and later)
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


needs_glibc = pytest.mark.skipif(not _has_mallinfo2(), reason="glibc's malloc (2.33 or later) only")

# Three rounds of three 24 MiB tensors held then freed, as a frame's
# intermediates; prints, per round, the heap's size (arena) and the mmapped
# bytes (hblkhd) while they are held and after they are freed, in MiB, then
# _malloc's state.
CHILD = textwrap.dedent("""
    import ctypes, sys
    import torch
    mode = sys.argv[1]
    if mode == "model":
        import pymatting_ext as pm
        model = pm.MattingBase("mobilenetv2").eval()
        with torch.inference_mode():
            model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    elif mode == "direct":
        from pymatting_ext import _malloc
        print(_malloc.keep_heap(), _malloc.keep_heap())
    from pymatting_ext import _malloc

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = Info

    def heap():
        info = mallinfo2()
        return info.arena >> 20, info.hblkhd >> 20

    for _ in range(3):
        ts = [torch.empty(24 << 20, dtype=torch.uint8).fill_(1) for _ in range(3)]
        held = heap()
        del ts
        print(*held, *heap())
    print(_malloc.state())
""")


def run_child(mode, **env):
    full = {k: v for k, v in os.environ.items() if k != _malloc.ENV_VAR}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=full, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().split("\n")
    rounds = [tuple(map(int, line.split())) for line in lines[-4:-1]]
    return rounds, lines[-1], lines


def assert_kept_in_heap(rounds):
    for arena_held, mmapped_held, arena_freed, mmapped_freed in rounds:
        assert arena_held >= 72, rounds  # (served by the heap...)
        assert mmapped_held < 24, rounds  # (...not mmapped afresh)
        assert arena_freed == arena_held, rounds  # (and not given back)


@needs_glibc
def test_without_it_a_fresh_process_maps_and_unmaps_such_tensors():
    # (What the thresholds change; shows the tests below can fail.)
    rounds, state, _ = run_child("none")
    assert state == "None"
    arena_held, mmapped_held, arena_freed, mmapped_freed = rounds[0]
    assert mmapped_held >= 72 and mmapped_freed < 24, rounds


@needs_glibc
def test_keep_heap_keeps_a_frames_tensors_in_the_heap():
    rounds, state, lines = run_child("direct")
    assert lines[0] == "True True"  # (set once; a second call says so too)
    assert state == "True"
    assert_kept_in_heap(rounds)


@needs_glibc
def test_cpu_inference_sets_it_and_the_variable_turns_it_off():
    rounds, state, _ = run_child("model")
    assert state == "True"
    assert_kept_in_heap(rounds)
    rounds, state, _ = run_child("model", **{_malloc.ENV_VAR: "0"})
    assert state == f"{_malloc.ENV_VAR}=0"


@pytest.mark.parametrize("name, value, why", [
    ("MALLOC_TRIM_THRESHOLD_", "100000", "MALLOC_TRIM_THRESHOLD_"),
    ("MALLOC_ARENA_MAX", "2", "MALLOC_ARENA_MAX"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=100000", "GLIBC_TUNABLES"),
    ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "another allocator"),
    (_malloc.ENV_VAR, "0", f"{_malloc.ENV_VAR}=0"),
])
def test_leaves_a_tuned_malloc_alone(monkeypatch, name, value, why):
    if not sys.platform.startswith("linux") and name != _malloc.ENV_VAR:
        pytest.skip("Linux only")
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD", _malloc.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    assert _malloc._why_not() == ("" if sys.platform.startswith("linux") else "not Linux")
    monkeypatch.setenv(name, value)
    assert why in _malloc._why_not()


SOAK = textwrap.dedent("""
    import torch
    import pymatting_ext as pm
    from pymatting_ext import _malloc

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    torch.manual_seed(0)
    model = pm.MattingRefine("mobilenetv2", 0.25, "sampling", 4000, 0.1, 3, False).eval()
    frames = [(torch.rand(1, 3, 272, 480), torch.rand(1, 3, 272, 480)) for _ in range(4)]
    with torch.inference_mode():
        for i in range(40):
            model(*frames[i % 4])
        start = peak = rss()
        for i in range(400):
            model(*frames[i % 4])
            if i % 20 == 0:
                peak = max(peak, rss())
    print(_malloc.state(), (max(peak, rss()) - start) / 2 ** 20)
""")


@needs_glibc
def test_a_long_run_of_frames_keeps_the_memory_flat():
    # (The heap is no longer trimmed between frames: it must still not grow.)
    env = {k: v for k, v in os.environ.items() if k != _malloc.ENV_VAR}
    out = subprocess.run([sys.executable, "-c", SOAK], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    state, growth = out.stdout.split()[-2:]
    assert state == "True"
    assert float(growth) < 16, f"RSS grew by {float(growth):.1f} MiB over 400 frames"
