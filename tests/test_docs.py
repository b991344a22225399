"""The documentation holds together: the README stays short, and what it and docs/ point to exists.

No processes here: these read Markdown files. A relative link must name a file of the checkout
(and, with an anchor, a heading of that file), or a page in PENDING_PAGES, the pages other
branches are writing; once a page exists its links are checked like any other, and a page that
has landed should leave the list.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 300

# Pages the README links to that other work is writing; tighten this list as they land.
PENDING_PAGES: set = set()

# The two commands the README promises; .ci/run runs the second exactly.
DEMO_COMMAND = "python -m pip install -e . && python -m mplog demo"
TEST_COMMAND = "python -m pip install -e '.[test,dask]' && python -m pytest"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _pages() -> List[Path]:
    pages = [README, ROOT / "CHANGELOG.md", ROOT / "scripts" / "README.md"]
    pages += sorted((ROOT / "docs").glob("*.md"))
    return [p for p in pages if p.exists()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} +(.+?) *$", text, re.M)}


def _links() -> Iterator[Tuple[Path, str]]:
    for page in _pages():
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):     # http:, https:, mailto:
                continue
            yield page, target


def test_readme_fits_on_a_few_screens() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_readme_keeps_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert DEMO_COMMAND in text
    assert TEST_COMMAND in text
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert TEST_COMMAND in ci.read_text(encoding="utf-8")


@pytest.mark.parametrize("page,target", list(_links()), ids=lambda v: v.relative_to(ROOT).as_posix() if isinstance(v, Path) else v)
def test_relative_links_resolve(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
    if not dest.exists():
        assert rel in PENDING_PAGES, f"{page.relative_to(ROOT)} links to {target}: no such file"
        return
    if anchor and dest.suffix == ".md":
        assert anchor in _anchors(dest), f"{page.relative_to(ROOT)} links to {target}: no such heading"


def test_tests_the_readme_names_exist() -> None:
    text = README.read_text(encoding="utf-8")
    named = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", text)
    assert named, "the Guarantees section names its tests"
    for module, test in named:
        source = ROOT / "tests" / module
        assert source.exists(), f"README names {module}, which is not in tests/"
        if test:
            assert re.search(rf"^\s*def {test}\(", source.read_text(encoding="utf-8"), re.M), \
                f"README names {module}::{test}, which is not there"


def test_scripts_the_docs_run_exist() -> None:
    # experiments.md is about scripts that git keeps, not the tree: it is left out.
    for page in _pages():
        if page.name == "experiments.md":
            continue
        for name in re.findall(r"python (scripts/[\w.]+\.py)", page.read_text(encoding="utf-8")):
            assert (ROOT / name).exists(), f"{page.relative_to(ROOT)} runs {name}, which is not there"
