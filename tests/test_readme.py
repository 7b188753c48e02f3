"""Every ```python block of README.md runs as written: in README order (a later block may use a file
an earlier one saved), each in a fresh namespace, in a temporary directory, on the bundled model with
the README's own small settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


def test_python_blocks_are_found():
    blocks = python_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n")
    assert blocks == [(3, "x = 1\n"), (9, "y = 2\n")]


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    for line, code in blocks:
        # padded so that a traceback names the README's own line numbers
        compiled = compile("\n" * (line - 1) + code, str(README), "exec")
        try:
            exec(compiled, {"__name__": "readme"})
        except Exception as e:
            pytest.fail(f"the python block at README.md line {line} fails: {type(e).__name__}: {e}")
