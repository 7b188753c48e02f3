"""Choosing tokens: inverse-CDF sampling draws from the (top-k / top-p cut) tempered distribution,
log-probs are untruncated, and each sequence's random stream depends only on (seed, its index)."""

from __future__ import annotations

import torch

from thoughtfold.config import SamplingConfig
from thoughtfold.engine.sampling import TokenChooser, row_uniforms, sample


def test_inverse_cdf_sampling_draws_from_the_distribution():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0, -3.0])
    n = 40_000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, logprobs = sample(logits.expand(n, -1), SamplingConfig(temperature=0.7), uniforms)
    expected = torch.softmax(logits / 0.7, -1)
    frequencies = torch.bincount(tokens, minlength=6) / n
    assert (frequencies - expected).abs().max() < 0.01  # ~4 standard errors
    assert torch.allclose(logprobs, expected.log()[tokens])


def test_top_k_and_top_p_never_draw_cut_tokens_and_keep_untruncated_logprobs():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0, 1.0]]).expand(5000, -1)
    uniforms = torch.rand(5000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens, logprobs = sample(logits, SamplingConfig(top_k=2), uniforms)
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0])
    probs = torch.softmax(logits[0], -1)  # 0.48, 0.29, 0.18, ...: the smallest prefix reaching 0.7 is {0, 1}
    assert probs[:1].sum() < 0.7 <= probs[:2].sum()
    assert set(sample(logits, SamplingConfig(top_p=0.7), uniforms)[0].tolist()) == {0, 1}
    edges = torch.tensor([0.0, 1.0 - 2.0**-53])  # the smallest and largest uniforms
    assert sample(logits[:2], SamplingConfig(top_k=2), edges)[0].tolist() == [0, 1]


def test_each_sequence_has_its_own_stream():
    a = row_uniforms(7, 3, 50)
    assert torch.equal(a, row_uniforms(7, 3, 50)) and torch.equal(a[:20], row_uniforms(7, 3, 20))
    assert not torch.equal(a, row_uniforms(7, 4, 50)) and not torch.equal(a, row_uniforms(8, 3, 50))
    assert a.min() >= 0 and a.max() < 1


def test_chooser_reads_each_slots_sequence_at_its_own_clock():
    """Slot order and admission time do not matter: slot s decoding sequence r at token t draws
    uniform t of r's stream."""
    chooser = TokenChooser(SamplingConfig(max_new_tokens=10, seed=11), 3, torch.device("cpu"))
    chooser.start(torch.tensor([2, 0]), [5, 1])
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    clock = torch.tensor([4, 0, 9])
    tokens, _ = chooser(logits, clock)
    for slot, row in ((0, 1), (2, 5)):
        uniform = row_uniforms(11, row, 10)[clock[slot]][None]
        alone, _ = sample(logits[slot : slot + 1], chooser.sampling, uniform)
        assert tokens[slot] == alone[0]
    forced = TokenChooser(SamplingConfig(max_new_tokens=3, temperature=2.0), 2, torch.device("cpu"),
                          forced=torch.tensor([[4, 5, 6], [7, 8, 9]]))
    forced.start(torch.tensor([0, 1]), [1, 0])
    tokens, logprobs = forced(logits[:2], torch.tensor([2, 1]))
    assert tokens.tolist() == [9, 5]
    assert torch.allclose(logprobs, torch.log_softmax(logits[:2] / 2.0, -1)[[0, 1], [9, 5]])
