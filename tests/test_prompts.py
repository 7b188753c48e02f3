"""Prompts as token ids: the chat template, plain text, token ids passed through, bad prompts."""

from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer
from thoughtfold.errors import DataError
from thoughtfold.prompts import encode_prompt


@pytest.fixture(scope="module")
def byte_tok():
    return byte_tokenizer()


def test_encode_prompt_chat_template(byte_tok):
    ids = encode_prompt(byte_tok, "What is 2+3?")
    assert byte_tok.decode(ids) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert all(isinstance(t, int) for t in ids)


def test_encode_prompt_system_prompt(byte_tok):
    ids = encode_prompt(byte_tok, "hi", system_prompt="Be brief.")
    assert byte_tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_encode_prompt_plain(byte_tok):
    ids = encode_prompt(byte_tok, "What is 2+3?", chat_template=False)
    assert byte_tok.decode(ids) == "What is 2+3?"
    assert len(ids) == len("What is 2+3?")  # byte-level, no specials added by this tokenizer


def test_encode_prompt_without_template_falls_back_to_plain(byte_tok):
    tok = byte_tokenizer()
    tok.chat_template = None
    assert encode_prompt(tok, "abc") == encode_prompt(byte_tok, "abc", chat_template=False)


def test_encode_prompt_token_ids_pass_through(byte_tok):
    assert encode_prompt(byte_tok, [5, 6, 7]) == [5, 6, 7]
    assert encode_prompt(byte_tok, torch.tensor([1, 2])) == [1, 2]


@pytest.mark.parametrize("bad", [[], [1, -2], [1.5], "", 42])
def test_encode_prompt_bad_input(byte_tok, bad):
    with pytest.raises(DataError):
        encode_prompt(byte_tok, bad, chat_template=False)
