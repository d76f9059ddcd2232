"""One set of exit codes and run markers: the README's exit-code table and cluster/launch.sh's constants
say what dist_vae/errors.py's ExitCode and dist_vae/run_layout.py's RunDir say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_vae.engine.stops import UNREACHABLE
from dist_vae.errors import ExitCode
from dist_vae.run_layout import RunDir

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\|(.*)\|\s*$")


def exit_code_rows(readme: str) -> dict[str, int]:
    """{name: code} of the table under the heading that names "Exit codes" (up to the next heading):
    each row's code is its one cell holding a bare integer, its name the cell naming an ExitCode
    member (`NAME` or `ExitCode.NAME`). Fails when there is no such heading or table."""
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("#") and "exit codes" in line.lower()]
    assert starts, "README.md has no heading containing 'Exit codes'"
    rows: dict[str, int] = {}
    for line in lines[starts[0] + 1 :]:
        if line.startswith("#"):
            break
        found = ROW.match(line.strip())
        if not found:
            continue
        cells = [cell.strip().strip("`") for cell in found.group(1).split("|")]
        codes = [int(cell) for cell in cells if re.fullmatch(r"\d+", cell)]
        if not codes:  # the header and the |---| line
            continue
        names = [c.removeprefix("ExitCode.") for c in cells if re.fullmatch(r"(ExitCode\.)?[A-Z][A-Z_]+", c)]
        assert len(codes) == 1 and len(names) == 1, (
            f"README exit-code row needs one name and one code: {line}"
        )
        assert names[0] not in rows, f"README names {names[0]} twice in its exit-code table"
        rows[names[0]] = codes[0]
    assert rows, "README.md's 'Exit codes' section has no table rows"
    return rows


def test_the_readme_table_lists_every_exit_code_and_no_other() -> None:
    rows = exit_code_rows((ROOT / "README.md").read_text())
    assert rows == {member.name: member.value for member in ExitCode}


def shell_constants(script: str) -> dict[str, str]:
    """NAME=value assignments at the start of a line (quotes removed, comments dropped)."""
    found = re.findall(r'^([A-Z_]+)="?([^"\s#]*)"?', script, re.M)
    return dict(found)


def test_launch_sh_uses_the_enum_s_codes_and_run_layout_s_names() -> None:
    script = (ROOT / "cluster" / "launch.sh").read_text()
    constants = shell_constants(script)
    exits = {name.removesuffix("_EXIT"): int(v) for name, v in constants.items() if name.endswith("_EXIT")}
    assert exits, "cluster/launch.sh defines no NAME_EXIT constants"
    assert {"HANG", "REFUSED", "DIVERGED", "STORE_UNREACHABLE"} <= set(exits)
    for name, value in exits.items():
        assert ExitCode[name] == value, (
            f"cluster/launch.sh: {name}_EXIT={value}, ExitCode.{name}={ExitCode[name]}"
        )
    markers = {name.removesuffix("_MARKER"): v for name, v in constants.items() if name.endswith("_MARKER")}
    assert markers == {m.upper(): m for m in RunDir.MARKERS}, markers
    assert constants["UNREACHABLE_REASON"] == UNREACHABLE  # the requeue marker's reason line
    run = RunDir("/run")
    assert constants["HANG_DIR"] == run.hang.relative_to(run.root).as_posix()
    assert "rank-*.txt" in script and run.hang_stacks(0).name == "rank-0.txt"
    # Any other code leaves through its constant: bare numbers are only 0 (SUCCESS).
    code_lines = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    bare = {int(code) for code in re.findall(r"\bexit (\d+)\b", code_lines)}
    assert bare <= {ExitCode.SUCCESS}, f"cluster/launch.sh exits with bare codes {sorted(bare)}"


PROBE_ROWS = "| Name | Code | Meaning |\n|---|---|---|\n" + "".join(
    f"| `{m.name}` | {m.value} | x |\n" for m in ExitCode
)


@pytest.mark.parametrize(
    ("readme", "fails"),
    [
        (f"# x\n\n## Exit codes\n\n{PROBE_ROWS}\n## Next\n| `OTHER` | 9 | y |\n", False),
        ("# x\n\n## Failure modes\n\n| `HANG` | 5 | y |\n", True),  # no section
        ("# x\n\n## Exit codes\n\nno table\n", True),
    ],
)
def test_the_table_parser_fails_without_the_section(readme: str, fails: bool) -> None:
    if fails:
        with pytest.raises(AssertionError):
            exit_code_rows(readme)
    else:
        assert exit_code_rows(readme) == {m.name: m.value for m in ExitCode}


def test_an_extra_or_wrong_code_is_caught() -> None:
    extra = exit_code_rows(f"## Exit codes\n\n{PROBE_ROWS}| `PAUSED` | 6 | z |\n")
    assert extra != {m.name: m.value for m in ExitCode}
    wrong = exit_code_rows(f"## Exit codes\n\n{PROBE_ROWS.replace('| 5 |', '| 7 |')}")
    assert wrong != {m.name: m.value for m in ExitCode}
