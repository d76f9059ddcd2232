"""train.compile=auto|on|off: compiled before the wrap on a GPU (or when on), and on the CPU only when
the timed steps say the rest of the run pays back the estimated compile time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_vae.config import load_config
from dist_vae.engine.backend import compiles_before_wrap
from dist_vae.engine.compile_choice import SECONDS_PER_OPERATION, choose, compile_seconds
from dist_vae.engine.trainer import Trainer
from dist_vae.engine.watchdog import HANG_EXIT_CODE
from tests.engine_util import ROOT, check, env, python_cmd, run, train_args
from tests.test_plan import TINY

DECISION = "train.compile=auto on the CPU: "


def test_compiling_pays_only_past_the_break_even() -> None:
    # 1,000 steps left x 0.1 s x 0.25 saved = 25 s against the estimated compile time.
    assert choose(1000, 0.1, 24.0) and not choose(1000, 0.1, 26.0)
    # The debug PixelVAE (5,470 operations, 93 ms a step on this CPU) breaks even near 6,100 steps.
    estimate = 5470 * SECONDS_PER_OPERATION["pixel_vae"]
    assert not choose(6000, 0.093, estimate) and choose(6200, 0.093, estimate)


@pytest.mark.parametrize(
    ("setting", "device", "compiles"),
    [("on", "cpu", True), ("off", "cpu", False), ("auto", "cpu", False),
     ("on", "cuda", True), ("off", "cuda", False), ("auto", "cuda", True)],
)  # fmt: skip
def test_compiled_before_the_wrap_when_on_or_auto_on_a_gpu(setting: str, device: str, compiles: bool) -> None:
    cfg = load_config(None, [f"train.compile={setting}"])
    assert compiles_before_wrap(cfg, torch.device(device)) is compiles


def test_old_boolean_settings_load_as_switches(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    # YAML reads on/off as booleans too.
    written_as = {"false": "off", "true": "on", "off": "off", "on": "on", "'false'": "off"}
    for written, setting in written_as.items():
        path.write_text(f"train:\n  compile: {written}\n")
        assert load_config(path).train.compile == setting, written
    overridden = [load_config(None, [f"train.compile={v}"]).train.compile for v in ("true", "False", "auto")]
    assert overridden == ["on", "off", "auto"]
    assert load_config(ROOT / "tests/fixtures/bf2ea00/pixel_vae/config.yaml").train.compile == "off"
    assert load_config(None).train.compile == "auto"


def test_counting_operations_leaves_the_random_streams_alone() -> None:
    cfg = load_config(None, [*TINY["pixel_vae"], "data.resolution=16"])
    torch.manual_seed(3)
    before = torch.get_rng_state()
    estimate, operations = compile_seconds(cfg)
    assert torch.equal(torch.get_rng_state(), before)
    assert operations > 100 and estimate == operations * SECONDS_PER_OPERATION["pixel_vae"]


def test_the_iterative_vae_is_estimated_on_the_two_steps_it_compiles() -> None:
    """Steps 2..T compile to one shared graph, so T beyond 2 must not raise the estimate."""
    tiny = [*TINY["iterative_vae"], "data.resolution=16"]
    counts = [compile_seconds(load_config(None, [*tiny, f"model.refine_steps={t}"]))[1] for t in (1, 2, 6)]
    assert counts[0] < counts[1] == counts[2]


def test_a_short_cpu_run_prints_one_eager_decision_and_none_when_off(
    demo_shards: Path, tmp_path: Path
) -> None:
    auto = run(python_cmd(tmp_path / "auto", demo_shards, "train.steps=6"))
    check(auto)
    decisions = [line for line in auto.stderr.splitlines() if "train.compile" in line]
    # Steps 1 and 2 timed; decided at the boundary after step 3, with 3 steps left.
    assert len(decisions) == 1 and decisions[0].startswith(f"{DECISION}eager (3 steps left x "), decisions
    off = run(python_cmd(tmp_path / "off", demo_shards, "train.steps=6", "train.compile=off"))
    check(off)
    assert "train.compile" not in off.stderr


def compiled(model: nn.Module) -> bool:
    """Whether `model.compile()` ran on the model or (the iterative VAE's regions) on a submodule."""
    return any(m._compiled_call_impl is not None for m in model.modules())


class Stop(Exception):
    pass


def test_a_run_that_pays_back_compiles_in_place_after_three_eager_steps(
    demo_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Compiling estimated free: the model is compiled in place at the boundary after step 3. The test
    stops before the compiled step runs (inductor would take minutes)."""
    monkeypatch.setitem(SECONDS_PER_OPERATION, "iterative_vae", 0.0)
    overrides = train_args(tmp_path / "run", demo_shards, "train.steps=1000000", "train.checkpoint_every=100")
    seen: list[bool] = []

    def before_step(step: int) -> None:
        seen.append(compiled(trainer.backend.raw_model))
        if step == 3:
            raise Stop

    trainer = Trainer(load_config(overrides[1], overrides[2:]), before_step=before_step)
    with pytest.raises(Stop):
        trainer.fit()
    assert seen == [False, False, False, True]
    decisions = [line for line in capsys.readouterr().err.splitlines() if "train.compile" in line]
    assert len(decisions) == 1 and decisions[0].startswith(f"{DECISION}compile (999,997 steps left x ")
    assert " > ~0 s to compile " in decisions[0]


def test_the_compiling_step_gets_its_extension_once(tmp_path: Path) -> None:
    script = (
        "import time; from pathlib import Path; from dist_vae.engine import watchdog\n"
        "watchdog.GRACE_S = 0\n"
        f"w = watchdog.Watchdog(Path({str(tmp_path)!r}), 0, 0.5, 60.0)\n"
        "with w.watching(0):\n"
        "    with w.between_steps(1):\n"
        "        w.extend_next_step(2.0)\n"
        "    time.sleep(1.0)\n"  # past hang_timeout, within the extension
        "    with w.between_steps(2):\n"
        "        pass\n"
        "    time.sleep(1.5)\n"  # the next step has hang_timeout alone
    )
    cmd = [sys.executable, "-c", script]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == HANG_EXIT_CODE, done.stderr
    assert done.stderr.startswith("error: rank 0: no step boundary after step 2 (train.hang_timeout=0.5)")
