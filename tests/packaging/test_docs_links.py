"""The docs stay navigable: every relative Markdown link in the README, CONTRIBUTING.md, benchmarks/README.md and
docs/*.md names a file of the repository (and, with a #fragment, one of its headings), and the README stays a
short map.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
DOCS = sorted(
    [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")]
)
README_MAX_LINES = 220

#: [text](target) with no space in target; images ![alt](target) match too.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks.

    Args:
        text: the Markdown source.

    Returns:
        The lines that are not inside a ``` or ~~~ fence (fence lines excluded).
    """
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            lines.append(line)
    return lines


def heading_anchors(path: Path) -> set[str]:
    """The #fragments GitHub gives the headings of a Markdown file.

    Args:
        path: the Markdown file.

    Returns:
        One slug per heading: lower case, punctuation other than ``-`` and ``_`` dropped, spaces turned into
        ``-``, and ``-1``, ``-2``, ... appended to repeats.
    """
    anchors: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        unique, repeat = slug, 0
        while unique in anchors:
            repeat += 1
            unique = f"{slug}-{repeat}"
        anchors.add(unique)
    return anchors


def broken_links(doc: Path) -> list[str]:
    """The relative links of `doc` that name no file, or no heading of the file they name.

    Args:
        doc: a Markdown file of the repository.

    Returns:
        One "target: why" line per broken link (empty when all resolve).
    """
    broken = []
    for line in prose_lines(doc.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, fragment = target.partition("#")
            resolved = (doc.parent / file_part).resolve() if file_part else doc
            if not resolved.exists():
                broken.append(f"{target}: no such file")
            elif fragment and resolved.suffix == ".md" and fragment not in heading_anchors(resolved):
                broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    assert doc.is_file(), f"{doc.relative_to(ROOT)} is missing"
    assert broken_links(doc) == [], f"broken links in {doc.relative_to(ROOT)}"


def test_readme_is_a_short_map():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES} expected"


def test_link_check_catches_a_broken_link_and_anchor(tmp_path: Path):
    target = tmp_path / "target.md"
    target.write_text("# A heading, with `code`\n\n## A heading, with `code`\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](target.md#a-heading-with-code) [ok too](target.md#a-heading-with-code-1) [web](https://x.org/a)\n"
        "[missing](nowhere.md) [bad anchor](target.md#nothing)\n```\n[in a fence](ignored.md)\n```\n",
        encoding="utf-8",
    )
    assert heading_anchors(target) == {"a-heading-with-code", "a-heading-with-code-1"}
    assert [line.split(":")[0] for line in broken_links(doc)] == ["nowhere.md", "target.md#nothing"]
