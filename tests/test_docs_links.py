"""The README and docs/*.md: every relative link resolves to a file, the README stays short, and no
file carries commit hashes or work-log wording (users read these on any machine, at any version)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 170
# Commit hashes (a 7+ hex-digit word followed by a space) and phrases that only made sense on the
# machine and day a figure was taken.
FORBIDDEN = re.compile(r"this (2-core|VM|CPU)|[0-9a-f]{7,} |low-bandwidth hour")
# [text](target) or [text](target "title"); an image ![alt](target) matches too.
MD_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(path: Path):
    """(line number, target) of every link and <img src> in a Markdown file, fenced code excluded."""
    in_fence = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for pattern in (MD_LINK, IMG_SRC):
            for m in pattern.finditer(line):
                yield number, m.group(1)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One message per relative link (or <img src>) of `path` whose file does not exist; URLs
    with a scheme and pure #anchors are skipped, and a #anchor after a file name is ignored."""
    found = []
    for number, target in links(path):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file_part).exists():
            found.append(f"{path.relative_to(root)}:{number}: link target {target!r} does not exist")
    return found


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_commit_hashes_or_worklog_wording(path):
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert not hits, "forbidden wording:\n" + "\n".join(hits)


def test_readme_names_no_file_users_lack():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("shared/DESIGN.md", "recipes/x.py"):
        assert name not in text, f"README.md mentions {name}, which users do not have"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES}"


def test_readme_starts_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[:6] == ["# jaxaccel", "", "```bash",
                         "pip install -e '.[model]' && jaxaccel accelerate",
                         "pip install -e '.[test]' && python -m pytest", "```"]


def test_the_link_check_sees_a_broken_link(tmp_path):
    """The checker itself: a missing target is reported with file and line, while external URLs,
    anchors, existing files with anchors, and links inside code are not."""
    (tmp_path / "exists.md").write_text("# here\n")
    page = tmp_path / "page.md"
    page.write_text("intro\n[ok](exists.md#here) [web](https://example.com) [anchor](#top)\n"
                    "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
                    "[gone](missing.md#part) <img src=\"pic.png\">\n")
    problems = broken_links(page, root=tmp_path)
    assert problems == ["page.md:7: link target 'missing.md#part' does not exist",
                        "page.md:7: link target 'pic.png' does not exist"]
