"""README and docs/ stay true to the tree: every relative link resolves, every command of the
CLI is in README's table, every entry point README lists is exported."""

from __future__ import annotations

import re

import pytest

import caffe_alex
from caffe_alex.cli import COMMANDS
from tests.paths import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in _LINK.findall(page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_lists_every_command():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in COMMANDS if f"`caffe-alex {name}" not in readme
               and f"`{name}`" not in readme]  # fmt: skip
    assert not missing, f"README's command table lacks {missing}"


def test_readme_lists_every_entry_point_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert [name for name in caffe_alex.__all__ if f"`{name}`" not in readme] == []
    assert len(readme.splitlines()) <= 200


def test_every_docs_page_is_linked_from_readme():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []
