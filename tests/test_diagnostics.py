"""Training diagnostics: per parameter group, gradient norms and distance from init; per layer, the
state's RMS and the encoder's attention share on its global tokens, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from thoughtfold.config import AdapterConfig
from thoughtfold.engine.encoder import EncoderState, ThoughtEncoder
from thoughtfold.training.diagnostics import ParameterDiagnostics, join_states, state_metrics


def test_gradient_norms_are_averaged_over_updates_and_changes_measured_from_init():
    down, up = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))
    diag = ParameterDiagnostics({"adapter_down": [down], "adapter_up": [up]})
    for scale in (1.0, 3.0):
        down.grad, up.grad = torch.full((2, 3), scale), torch.zeros(3, 2)
        diag.record_gradients()
    with torch.no_grad():
        down.add_(0.5)
        up.fill_(2.0)
    out = diag.metrics()
    assert out["diag/grad_norm/adapter_down"] == pytest.approx((math.sqrt(6) + 3 * math.sqrt(6)) / 2)
    assert out["diag/grad_norm/adapter_up"] == 0.0
    assert out["diag/update_norm/adapter_down"] == pytest.approx(0.5 * math.sqrt(6))
    assert out["diag/rel_change/adapter_down"] == pytest.approx(0.5)
    assert out["diag/update_norm/adapter_up"] == pytest.approx(2 * math.sqrt(6))
    assert "diag/rel_change/adapter_up" not in out  # no scale to compare with at zero
    assert "diag/grad_norm/adapter_down" not in diag.metrics()  # no update since the last call


def test_state_rms_and_global_share_equal_a_one_shot_softmax():
    torch.manual_seed(0)
    layers, batch, kv, n_g = 3, 2, 12, 5
    encoder = ThoughtEncoder(layers, kv, AdapterConfig(mode="pte", rank=4, global_tokens=n_g)).double()
    state = encoder.initial_state(batch)
    shares = [v for k, v in state_metrics(encoder, state).items() if "global_share" in k]
    assert shares and all(v == pytest.approx(1.0) for v in shares)
    keys, values = torch.randn(2, layers, batch, 6, kv, dtype=torch.float64)
    state = encoder.absorb(state, keys[:, :, :3], values[:, :, :3])
    state = encoder.absorb(state, keys[:, :, 3:], values[:, :, 3:])
    out = state_metrics(encoder, state)
    for layer in range(layers):
        q, wk = encoder.queries[layer], encoder.key_proj[layer]
        globals_ = encoder.global_keys[layer][None].expand(batch, -1, -1)
        every = torch.cat([globals_, keys[layer]], 1)  # [B, n_g + 6, kv]
        p = torch.softmax(torch.einsum("ra,bna->brn", q, every @ wk) / math.sqrt(q.shape[-1]), -1)
        expected = p[..., :n_g].sum(-1).mean().item()
        assert out[f"diag/global_share/l{layer:02d}"] == pytest.approx(expected, rel=1e-9)
        rms = state.read()[layer].pow(2).mean().sqrt().item()
        assert out[f"diag/state_rms/l{layer:02d}"] == pytest.approx(rms, rel=1e-9)


def test_paper_state_update_reports_only_the_rms():
    encoder = ThoughtEncoder(2, 8, AdapterConfig(mode="pte", rank=4, global_tokens=2, state_update="paper"))
    out = state_metrics(encoder, encoder.initial_state(1))
    assert sorted(out) == ["diag/state_rms/l00", "diag/state_rms/l01"]


def test_joined_micro_batch_states_give_the_whole_batch_metrics():
    torch.manual_seed(1)
    encoder = ThoughtEncoder(2, 8, AdapterConfig(mode="pte", rank=4, global_tokens=3)).double()
    keys, values = torch.randn(2, 2, 5, 4, 8, dtype=torch.float64)
    state = encoder.absorb(encoder.initial_state(5), keys, values)

    def rows(a: int, b: int) -> EncoderState:
        return EncoderState(state.max[:, a:b], state.norm[:, a:b], state.num[:, a:b])

    whole = state_metrics(encoder, state)
    joined = state_metrics(encoder, join_states([rows(0, 2), rows(2, 5)]))
    assert sorted(joined) == sorted(whole) and len(whole) == 4
    assert all(joined[k] == pytest.approx(whole[k], rel=1e-12) for k in whole)
    assert state_metrics(encoder, rows(2, 5)) != whole  # the last micro-batch alone is another number
