"""The documentation stays true to the tree: every relative link and image resolves, every repository
path named in code exists, the README stays a front page, and history stays in CHANGELOG.md.

Each checker takes the repository root, so the probes below can run it on a small temporary tree and
show that it reports what it should.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_TAG = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A repository path as the docs name one: tools/x.py, dist_vae/..., configs/..., cluster/..., tests/...
REPO_PATH = re.compile(r"(?<![\w./$-])((?:tools|dist_vae|configs|cluster|tests)/[\w./-]*\w)")
# A commit id as people write one: 7 to 12 lowercase hex digits, or all 40, with at least one digit and
# one letter (so neither a plain number nor a hex-looking word such as "defaced"). Digests cut to 16,
# 32 or 64 digits (the tests' pinned pixel hashes, sha256 sums) are not commit ids.
COMMIT_ID = re.compile(
    r"(?<![\w.])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])(?:[0-9a-f]{40}|[0-9a-f]{7,12})(?![\w])"
)
ISSUE_REF = re.compile(r"\bissues? #?\d+\b", re.IGNORECASE)


def doc_files(root: Path) -> list[Path]:
    """README.md, CHANGELOG.md and every page in docs/."""
    return [p for p in [root / "README.md", root / "CHANGELOG.md"] if p.is_file()] + sorted(
        (root / "docs").glob("*.md")
    )


def fenced_and_not(text: str) -> tuple[list[str], list[str]]:
    """(lines inside fenced code blocks, the other lines), fence lines dropped."""
    inside, outside, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        else:
            (inside if fenced else outside).append(line)
    return inside, outside


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines with inline code removed, code: fenced blocks' lines and inline code spans)."""
    code, outside = fenced_and_not(text)
    prose = []
    for line in outside:
        code += [m.group()[1:-1] for m in INLINE_CODE.finditer(line)]
        prose.append(INLINE_CODE.sub("``", line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, outside = fenced_and_not(path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    found = set()
    for line in outside:
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """Relative links and images of one markdown file whose file (or, in markdown, anchor) is missing."""
    text = path.read_text(encoding="utf-8")
    prose, _ = split_code(text)
    problems = []
    for line in prose:
        for target in LINK.findall(line) + IMG_TAG.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            if not file_part:
                resolved = path
            elif file_part.startswith("/"):
                resolved = root / file_part.lstrip("/")
            else:
                resolved = path.parent / file_part
            where = f"{path.relative_to(root)}: {target}"
            if not resolved.exists():
                problems.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def missing_paths(path: Path, root: Path) -> list[str]:
    """Repository paths named in code (inline or fenced) of one markdown file that do not exist."""
    _, code = split_code(path.read_text(encoding="utf-8"))
    missing = []
    for chunk in code:
        for name in REPO_PATH.findall(chunk):
            if not (root / name).exists():
                missing.append(f"{path.relative_to(root)}: {name}")
    return missing


def text_files(root: Path, names: list[str]) -> list[Path]:
    """The files under the given names (files or folders), binary files and caches left out."""
    found = []
    for name in names:
        base = root / name
        for p in [base] if base.is_file() else sorted(base.rglob("*")):
            if not p.is_file() or "__pycache__" in p.parts or p.suffix in {".pyc"}:
                continue
            data = p.read_bytes()
            if b"\0" in data:
                continue
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            found.append(p)
    return found


def history_refs(paths: list[Path], root: Path) -> list[str]:
    """Lines naming a commit id or an issue number: history, which belongs in CHANGELOG.md."""
    hits = []
    for p in paths:
        for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for m in list(COMMIT_ID.finditer(line)) + list(ISSUE_REF.finditer(line)):
                hits.append(f"{p.relative_to(root)}:{number}: {m.group()}")
    return hits


def test_links_and_images_resolve() -> None:
    problems = [p for doc in doc_files(ROOT) for p in broken_links(doc, ROOT)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_paths_named_in_code_exist() -> None:
    """The README and docs/ (CHANGELOG.md may name files that are gone since)."""
    current = [doc for doc in doc_files(ROOT) if doc.name != "CHANGELOG.md"]
    missing = [m for doc in current for m in missing_paths(doc, ROOT)]
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def readme_too_long(path: Path) -> str | None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    return f"{path.name} has {lines} lines; at most {README_MAX_LINES}" if lines > README_MAX_LINES else None


def test_readme_is_a_front_page() -> None:
    problem = readme_too_long(ROOT / "README.md")
    assert problem is None, problem


def test_docs_hold_no_history() -> None:
    """README.md, docs/*.md and the Makefile: no commit ids, no issue numbers (CHANGELOG.md may)."""
    files = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    hits = history_refs(files, ROOT)
    assert not hits, "history outside CHANGELOG.md:\n" + "\n".join(hits)


def test_code_holds_no_commit_ids() -> None:
    """dist_vae/, tools/, tests/ and configs/: no commit ids (binary files aside). Kept apart from the
    docs' check so that a failure here points at the code."""
    files = text_files(ROOT, ["dist_vae", "tools", "tests", "configs"])
    hits = [h for h in history_refs(files, ROOT) if not ISSUE_REF.search(h.split(": ", 1)[1])]
    assert not hits, f"{len(hits)} commit ids in the code:\n" + "\n".join(hits)


def test_code_holds_no_issue_numbers() -> None:
    files = text_files(ROOT, ["dist_vae", "tools", "tests", "configs"])
    hits = [h for h in history_refs(files, ROOT) if ISSUE_REF.search(h.split(": ", 1)[1])]
    assert not hits, f"{len(hits)} issue numbers in the code:\n" + "\n".join(hits)


# Probes: each checker on a small tree, so that a checker that reports nothing cannot pass silently.


def make_tree(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "real.py").write_text("")
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Some section: here\n")
    return tmp_path


def test_probe_broken_links_are_reported(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    readme = root / "README.md"
    readme.write_text(
        "# Title\n[ok](docs/page.md) [ok anchor](docs/page.md#some-section-here) [here](#title)\n"
        "[gone](docs/missing.md) ![gone picture](docs/missing.png) [bad anchor](docs/page.md#nowhere)\n"
        "[web](https://example.org/x.md) `[not a link](docs/also-missing.md)`\n"
        '<img src="docs/gone.svg">\n```\n[in a fence](docs/fenced-missing.md)\n```\n'
    )
    problems = broken_links(readme, root)
    assert len(problems) == 4, problems
    for name in ("docs/missing.md", "docs/missing.png", "#nowhere", "docs/gone.svg"):
        assert any(name in p for p in problems), (name, problems)


def test_probe_missing_paths_are_reported(tmp_path: Path) -> None:
    root = make_tree(tmp_path)
    page = root / "docs" / "page.md"
    page.write_text(
        "Run `tools/real.py` and `tools/gone.py --flag`; see tools/prose-is-not-checked.py.\n"
        "```bash\npython tools/fenced_gone.py --config configs/none.yaml\n```\n"
    )
    assert sorted(missing_paths(page, root)) == [
        "docs/page.md: configs/none.yaml",
        "docs/page.md: tools/fenced_gone.py",
        "docs/page.md: tools/gone.py",
    ]


def test_probe_history_is_reported(tmp_path: Path) -> None:
    # Built from pieces, so that this file holds none of them.
    commit, issue, full, digest = (
        "bf2e" + "a00",
        "iss" + "ue 21",
        ("c0ff" + "ee12") * 5,
        ("e028" + "b592") * 2,
    )
    page = tmp_path / "page.md"
    page.write_text(
        f"measured against {commit} (see {issue}); sha256 {'ab12' * 16} is fine; so are 2048000,\n"
        f"{digest} (a pinned digest), 0x9e3779b9 and the word defaced; {full} is a full commit id\n"
    )
    hits = history_refs([page], tmp_path)
    assert hits == [f"page.md:1: {commit}", f"page.md:1: {issue}", f"page.md:2: {full}"], hits


def test_probe_long_readme_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("line\n" * README_MAX_LINES)
    assert readme_too_long(readme) is None
    readme.write_text("line\n" * (README_MAX_LINES + 1))
    assert (
        readme_too_long(readme) == f"README.md has {README_MAX_LINES + 1} lines; at most {README_MAX_LINES}"
    )


def test_probe_anchor_slugs() -> None:
    assert slug("Backends: DDP and DeepSpeed") == "backends-ddp-and-deepspeed"
    assert slug("FID, KID, precision and recall") == "fid-kid-precision-and-recall"
    assert slug("Procedural scenes with known factors: `--source scenes:N[:SEED]`") == (
        "procedural-scenes-with-known-factors---source-scenesnseed"
    )
