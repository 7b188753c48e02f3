"""Every ```python block of README.md and of the docs pages it sends readers to runs as written: in
order (README first, then the pages of DOC_PAGES; a later block may use a file an earlier one saved),
each in a fresh namespace, in one temporary directory, on the bundled model with the pages' own small
settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = ("python-api.md", "training.md", "eviction.md", "coming-from-trl.md")  # in the order they run
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_python_blocks_are_found():
    blocks = python_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n")
    assert blocks == [(3, "x = 1\n"), (9, "y = 2\n")]


def test_every_page_with_python_is_run():
    """A docs page that holds Python code is in DOC_PAGES, so its blocks cannot go stale."""
    with_code = {p.name for p in (ROOT / "docs").glob("*.md") if python_blocks(p.read_text(encoding="utf-8"))}
    assert with_code == set(DOC_PAGES)
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250  # it leads; docs/ hold the rest


def test_every_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pages = [README, *(ROOT / "docs" / name for name in DOC_PAGES)]
    for page in pages:
        blocks = python_blocks(page.read_text(encoding="utf-8"))
        assert blocks, f"{page.name} has no python block"
        for line, code in blocks:
            # padded so that a traceback names the page's own line numbers
            compiled = compile("\n" * (line - 1) + code, str(page), "exec")
            try:
                exec(compiled, {"__name__": "readme"})
            except Exception as e:
                pytest.fail(f"the python block at {page.name} line {line} fails: {type(e).__name__}: {e}")
