"""tools/bench/gpu.py --tiny: the trainer's step per mode with its prediction, written into a copy of
docs/performance.md between the markers, and every case of the second table, with finite numbers
(MFU against a peak given on the command line, as the CPU has none in the table); with --baseline
REV it appends speed.py's before/after against that revision on the same device."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from gpu import cases  # noqa: E402
from gpu_modes import BEGIN, END, busy_ms, write_docs  # noqa: E402


def table(lines: list[str], first: str) -> list[list[str]]:
    """The rows under the header line that starts with `first`, up to the next blank line."""
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == [first])
    rows = []
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


BASELINE = "HEAD"  # any revision of the tree will do: the test checks the comparison, not its result


@pytest.mark.slow
def test_tiny_gpu_bench_prints_every_row_with_finite_numbers(tmp_path: Path) -> None:
    """One run for both tables and, where the checkout has the history, the before/after against
    BASELINE (each start of the bench costs seconds)."""
    docs = tmp_path / "performance.md"
    has_baseline = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{BASELINE}^{{commit}}"])
    versus = [
        "--baseline",
        BASELINE,
        "--speed-args",
        "--rounds 1 --steps 1 --threads 1 --cases iterative-demo",
    ]
    out = subprocess.run(
        [sys.executable, "tools/bench/gpu.py", "--tiny", "--budget", "1e9", "--peak-flops", "1e9",
         "--write-docs", str(docs), *(versus if has_baseline.returncode == 0 else [])],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert "process group gloo, world size 1: init + all_reduce ok" in out, out
    if has_baseline.returncode == 0:
        check_versus_baseline(lines, out)

    modes = table(lines, "config")
    measured = [row for row in modes if row[1] != "graphed"]
    pairs = {
        (config, mode)
        for config in ("lsun_64_pixelvae", "lsun_256_iterative")
        for mode in ("eager", "compiled")
    }
    assert {(r[0], r[1]) for r in measured if r[2] == "2"} == pairs, out  # the config's batch (tiny: 2)
    assert any(r[2].endswith("*") for r in measured), out  # the planner's batch where it differs
    for row in measured:
        ops, kernels, graphs, host, gpu, step, rate, mfu = row[3:11]
        assert int(ops) > 100 and kernels == graphs == gpu == "-", row  # no GPU columns on a CPU
        assert all(float(v) > 0 for v in (host, step, rate, mfu)), row
        assert math.isclose(float(rate), int(row[2].rstrip("*")) / float(step) * 1e3, rel_tol=0.02), row
        assert row[11:13] == ["-", "-"], row  # peak memory and regime: GPU only
        assert float(row[13]) > 0 and row[14] == "ms" and row[15] in ("host-bound", "compute-bound"), row
    graphed = [row for row in modes if row[1] == "graphed"]
    assert graphed and all(" ".join(r[3:10]) == "not run: CUDA graphs need a GPU" for r in graphed), out
    written = docs.read_text()
    source = (ROOT / "docs" / "performance.md").read_text()
    assert written.split(BEGIN)[0] == source.split(BEGIN)[0]
    assert written.split(END)[1] == source.split(END)[1]
    block = written.split(BEGIN)[1].split(END)[0]
    assert block.count("\n| lsun_") == len(modes) and "not run: CUDA graphs need a GPU" in block

    rows = table(lines, "model")
    expected = [
        [c.kind, str(c.resolution), c.precision, "on" if c.checkpointing else "off"] for c in cases(True)
    ]
    assert [row[:4] for row in rows] == expected
    assert len(expected) == 8 and {r[2] for r in expected} == {"fp32", "bf16"}
    for row in rows:
        batch, rate, memory, mfu = row[4:]
        assert int(batch) > 0 and math.isfinite(float(rate)) and float(rate) > 0, row
        assert math.isfinite(float(memory)) and float(memory) > 0, row
        assert math.isfinite(float(mfu)) and float(mfu) > 0, row  # counted FLOPs over the given peak


def test_docs_without_the_markers_are_refused_and_left_alone(tmp_path: Path) -> None:
    source = tmp_path / "performance.md"
    source.write_text("# Performance\n")
    with pytest.raises(SystemExit, match="has no '<!-- bench-gpu: begin -->'"):
        write_docs("| table |\n", source, source)
    assert source.read_text() == "# Performance\n"


def test_gpu_time_is_the_union_of_the_kernels_intervals() -> None:
    def event(start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end))

    # 0-1000 and 500-1500 overlap (two streams), 3000-3500 stands alone: 1.5 + 0.5 ms busy.
    assert busy_ms([event(3000, 3500), event(500, 1500), event(0, 1000)]) == 2.0
    assert busy_ms([]) == 0.0


def check_versus_baseline(lines: list[str], out: str) -> None:
    """speed.py's before/after against BASELINE, appended after the tables."""
    title = f"step time, this tree against {BASELINE} (tools/bench/speed.py)"
    assert title in lines and lines[lines.index(title) + 1].startswith("cpu, 1 threads"), out
    timed, counted = (line.split() for line in lines if line.startswith("iterative-demo"))
    old, new, ratio, target = (float(v) for v in timed[1:5])
    assert old > 0 and new > 0 and math.isclose(ratio, old / new, rel_tol=0.05) and target == 1.3, timed
    assert counted[2] == counted[5] == counted[8] == "->", counted
    assert all(float(v) > 0 for v in counted[1::3] + counted[3::3]), counted
