"""Shared fixtures: tiny random-init models of every supported family, saved as local directories
with a byte-level tokenizer and a chat template, so tests exercise the same loading path as users
without touching the Hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from intra-op threads, and a shared 2-core machine loses a lot to them
torch.set_num_threads(1)

FAMILIES = ("llama", "qwen2", "qwen3")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow are skipped unless --runslow is given (CI runs the fast suite)."""
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def byte_tokenizer():
    """A 259-token byte-level BPE tokenizer (256 bytes + 3 specials) built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    )
    fast.chat_template = CHATML
    return fast


def tiny_config(family: str, vocab_size: int = 259, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=256, pad_token_id=256, tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    raise ValueError(family)


def make_tiny_model_dir(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random-init model of `family` plus the byte tokenizer to `path`."""
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer()
    cfg = tiny_config(family, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # spread the logits so that greedy decoding has no near-ties
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny model directory per supported family."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model_dir(f, root / f) for f in FAMILIES}


def adapted_policy(tiny_dirs: dict[str, Path], family: str, mode: str, window: int | None = 8, **adapter):
    """A Policy over one of the tiny models with a rank-4 adapter of `mode` (3 global tokens in pte)."""
    from transformers import AutoModelForCausalLM

    from thoughtfold.config import AdapterConfig, CacheConfig
    from thoughtfold.policy import Policy

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    return Policy(model, byte_tokenizer(), cache=CacheConfig(window=window),
                  adapter=AdapterConfig(mode=mode, rank=4, global_tokens=3, **adapter),
                  base_model=str(tiny_dirs[family]))


def assert_close_to_scale(actual, expected, rel: float) -> None:
    """Max abs difference <= rel x the largest |expected|. Float rounding scales with the magnitude of
    the values a result is summed from, not with each element, so a fixed absolute tolerance (or a
    per-element relative one) passes or fails depending on the CPU's instruction set."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x max |expected| {scale:.3g}"


def end_at_different_steps(policy, prompts, n_new, **sampling):
    """Make EOS tokens of some tokens that the sequences (decoded with `sampling`) first produce at
    different depths, never before the window's second event: the sequences then end, and free their
    slots, at different steps (each keeps its tokens: its random stream is its own)."""
    policy.model.generation_config.eos_token_id = 256
    free = policy.generate(prompts, max_new_tokens=n_new, **sampling).completion_ids
    first = {}
    for row in free:
        for depth, token in enumerate(row):
            first[token] = min(first.get(token, n_new), depth)
    late = sorted((depth, token) for token, depth in first.items() if depth >= 9)
    policy.model.generation_config.eos_token_id = [256, *(token for _, token in late[::3][:3])]


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """A written, non-trivial PNG file (the plots the commands draw)."""
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC
