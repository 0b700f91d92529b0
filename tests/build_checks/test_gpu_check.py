"""tests/gpu_check.sh against the GPU machine's limits, without a GPU: each
documented command fits its deadline by the phase limits written in the
script, and a run killed at any moment has already left in $OUT a summary
naming each phase it finished, with its verdict and duration."""
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "gpu_check.sh"
#: One command's limit on the GPU machine is 600 s; the script's deadline
#: leaves room for the start and the transfers.
DEADLINE = 540


def test_each_part_fits_the_deadline_by_its_phase_limits():
    plan = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, check=True).stdout
    parts = dict(re.findall(r"^(part\d): (.*)$", plan, re.M))
    assert set(parts) == {"part1", "part2", "part3"}, plan
    for part, line in parts.items():
        m = re.fullmatch(r"((?: ?[a-z]+ \d+)+) = (\d+) s \(deadline (\d+) s\)", line)
        assert m, line
        limits = [int(n) for n in re.findall(r"\d+", m.group(1))]
        assert sum(limits) == int(m.group(2)), line
        assert sum(limits) <= int(m.group(3)) <= DEADLINE, line
    # The fused cases come before the other tests, the sanitizers after them.
    assert parts["part1"].index("fused") < parts["part1"].index("tests")
    assert "sanitize" in parts["part2"] and "sanitize" not in parts["part1"]


def test_a_killed_run_has_already_left_its_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_WORK=str(work))
    run = subprocess.Popen(["bash", str(SCRIPT), "env", "deps"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT, start_new_session=True)
    summary = out / "summary.txt"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if summary.exists() and re.search(r"^env +(PASS|FAIL|TIMEOUT)", summary.read_text(), re.M):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the env phase left no verdict in $OUT/summary.txt")
    finally:
        # As the GPU machine stops a command at its limit: everything, at once.
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    text = summary.read_text()
    assert re.search(r"^env +(PASS|FAIL \(exit \d+\)|TIMEOUT \(\d+ s\)) +\d+ s", text, re.M), text
    assert (out / "tails.txt").read_text().startswith("=== env ===")
    assert (out / "gpu_check.tar.gz").stat().st_size > 0
    # Nothing half-written is left behind.
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]
