"""The documentation a clone carries is complete: every relative link of the Markdown pages
resolves (file and section), every ``docs/…md#section`` the code cites exists, and nothing
cites the design notes that live outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md",
                *(REPO / "docs").glob("*.md")])
SOURCES = ("dvpo_lightning", "configs", "tests", "benchmarks", "scripts", "docs")
SOURCE_SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".md", ".toml"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITATION = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
# the design notes this project was written from, kept outside the repository
OUTSIDE = re.compile("|".join(["ALGORITHM" + r"\.md", "DESIGN" + r"\.md",
                               r"shared/" + "reference", r"shared/" + "DESIGN"]))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _sources() -> list[Path]:
    files = [REPO / "README.md"]
    for top in SOURCES:
        files += [p for p in (REPO / top).rglob("*")
                  if p.suffix in SOURCE_SUFFIXES and p.is_file() and ".venv" not in p.parts]
    return sorted(files)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no section #{anchor} in {dest.relative_to(REPO)}")
    assert broken == [], f"{page.relative_to(REPO)}: broken links {broken}"


def test_every_docs_citation_of_the_code_resolves():
    broken = []
    for f in _sources():
        for name, anchor in CITATION.findall(f.read_text(errors="replace")):
            page = REPO / "docs" / name
            if not page.exists():
                broken.append(f"{f.relative_to(REPO)}: docs/{name} does not exist")
            elif anchor and anchor not in _anchors(page):
                broken.append(f"{f.relative_to(REPO)}: docs/{name} has no section #{anchor}")
    assert broken == []


def test_nothing_cites_notes_outside_the_repository():
    """A clone has no design notes beside it: what a reader needs is in ``docs/``
    (``docs/algorithm.md`` for the maths, ``docs/design.md`` for the architecture)."""
    hits = [f"{f.relative_to(REPO)}:{i}: {line.strip()}"
            for f in _sources() if f != Path(__file__).resolve()
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
            if OUTSIDE.search(line)]
    assert hits == []
