"""The terminal streamer with which `thoughtfold generate` prints a single prompt's completion as it
is generated."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO


class TerminalStreamer:
    """Prints one sequence's text as it is generated (a transformers-style streamer: `put` gets the
    new token ids, `end` finishes). Text is printed up to word boundaries, incomplete UTF-8 is held
    back, and nothing is printed after an EOS token or past the first stop string -- what ends up on
    the terminal is the text `generate` returns."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: Sequence[str] = (), out: IO[str] | None = None):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop = [s for s in stop if s]
        self.out = out if out is not None else sys.stdout
        self._keep = max((len(s) for s in self.stop), default=1)
        self._ids: list[int] = []
        self._printed = 0  # characters of decode(self._ids) already written
        self._tail = ""  # last characters written before self._ids started (for stops across lines)
        self._finished = False

    def put(self, value) -> None:
        """Take the next token id(s) of a batch of one."""
        if self._finished:
            return
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        for tid in ids:
            if tid in self.eos_ids:
                self._finish()
                return
            self._ids.append(int(tid))
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            if self.stop and any(s in self._tail + text for s in self.stop):
                self._finish()  # writes the rest of `text`
                return
            if text.endswith("\n"):
                self._write(text[self._printed :])
                self._tail = (self._tail + text)[-self._keep :]
                self._ids, self._printed = [], 0
            elif not text.endswith("\ufffd"):
                cut = text.rfind(" ") + 1
                if cut > self._printed:
                    self._write(text[self._printed : cut])
                    self._printed = cut

    def end(self) -> None:
        """Flush what is left and end the line."""
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._ids:
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            self._write(text[self._printed :])
        self._write("\n")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
