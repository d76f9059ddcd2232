"""tools/bench/gpu.py --tiny: every case runs on the CPU and the table holds finite numbers (MFU
against a peak given on the command line, as the CPU has none in the table); with --baseline REV it
appends speed.py's before/after against that revision on the same device."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from gpu import cases  # noqa: E402


@pytest.mark.slow
def test_tiny_gpu_bench_prints_every_row_with_finite_numbers() -> None:
    out = subprocess.run(
        [sys.executable, "tools/bench/gpu.py", "--tiny", "--budget", "1e9", "--peak-flops", "1e9"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert "process group gloo, world size 1: init + all_reduce ok" in out, out
    assert "this tree against" not in out  # the before/after runs only against a given revision
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "px"])
    rows = [line.split() for line in lines[header + 1 :]]
    expected = [
        [
            c.kind,
            str(c.resolution),
            c.precision,
            "on" if c.checkpointing else "off",
            "on" if c.compiled else "off",
        ]
        for c in cases(tiny=True)
    ]
    assert [row[:5] for row in rows] == expected
    assert len(expected) == 12 and {r[2] for r in expected} == {"fp32", "bf16"}
    for row in rows:
        batch, rate, memory, mfu = row[5:]
        assert int(batch) > 0 and math.isfinite(float(rate)) and float(rate) > 0, row
        assert math.isfinite(float(memory)) and float(memory) > 0, row
        assert math.isfinite(float(mfu)) and float(mfu) > 0, row  # counted FLOPs over the given peak


BASELINE = "HEAD"  # any revision of the tree will do: the test checks the comparison, not its result


def test_versus_baseline_prints_speed_before_after_on_the_same_device() -> None:
    has_baseline = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BASELINE}^{{commit}}"])
    if has_baseline.returncode != 0:
        pytest.skip(f"this checkout has no git history up to {BASELINE}")
    speed_args = ["--speed-args", "--rounds 1 --steps 1 --threads 1 --cases iterative-demo"]
    bench = ["tools/bench/gpu.py", "--tiny", "--budget", "0", "--baseline", BASELINE, *speed_args]
    out = subprocess.run(
        [sys.executable, *bench],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    title = f"step time, this tree against {BASELINE} (tools/bench/speed.py)"
    assert title in lines and lines[lines.index(title) + 1].startswith("cpu, 1 threads"), out
    timed, counted = (line.split() for line in lines if line.startswith("iterative-demo"))
    old, new, ratio, target = (float(v) for v in timed[1:5])
    assert old > 0 and new > 0 and math.isclose(ratio, old / new, rel_tol=0.05) and target == 1.3, timed
    assert counted[2] == counted[5] == counted[8] == "->", counted
    assert all(float(v) > 0 for v in counted[1::3] + counted[3::3]), counted
