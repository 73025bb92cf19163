"""../shared/corpus: where it is and what its SOURCES.md table says about each file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# CAFFE_ALEX_CORPUS points a checkout that does not sit beside shared/ (a git worktree) at it
CORPUS = Path(
    os.environ.get("CAFFE_ALEX_CORPUS")
    or Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
)


@dataclass
class Entry:
    path: str
    format: str
    layer_types: str
    bvlc_parse: str

    @property
    def bvlc_accepts(self) -> bool:
        return self.bvlc_parse.startswith("yes")


def corpus_table() -> dict[str, Entry]:
    """SOURCES.md's table, by path relative to the corpus folder."""
    entries = {}
    for line in (CORPUS / "SOURCES.md").read_text().splitlines():
        if not re.match(r"\|\s*\d+\s*\|", line):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        path = cells[1].strip("`")
        entries[path] = Entry(path, cells[6], cells[7], cells[8])
    return entries
