"""Training diagnostics logged beside the loss: why a run learns or does not.

Per parameter group (the adapters' down- and up-projections, the thought encoder): the gradient
norm before clipping, and how far the parameters have moved from their initial values. For PTE,
per layer: the RMS of the state S the adapters read, and the share of the encoder's attention that
sits on its global tokens (1.0: the state ignores what was evicted; near 0: the global tokens play
no part).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..engine.encoder import EncoderState, ThoughtEncoder


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


class ParameterDiagnostics:
    """Gradient norms and the distance from init of each named parameter group. The initial values
    are copied when this is built, before any update (a resumed run rebuilds its policy from the
    same seed first, so its copies are the run's initial values too)."""

    def __init__(self, groups: dict[str, list[torch.Tensor]]):
        self.groups = groups
        self.initial = {name: [p.detach().clone() for p in params] for name, params in groups.items()}
        self._grad_norms: dict[str, list[float]] = {name: [] for name in groups}

    def record_gradients(self) -> None:
        """Note each group's gradient norm (call before clipping; once per optimizer update)."""
        for name, params in self.groups.items():
            self._grad_norms[name].append(_norm([p.grad for p in params if p.grad is not None]))

    def metrics(self) -> dict[str, float]:
        """`diag/grad_norm/<group>` (mean over the updates since the last call), `diag/update_norm/
        <group>` (|theta - theta_0|) and `diag/rel_change/<group>` (|theta - theta_0| / |theta_0|, for
        groups that do not start at zero)."""
        out: dict[str, float] = {}
        for name, params in self.groups.items():
            norms, self._grad_norms[name] = self._grad_norms[name], []
            if norms:
                out[f"diag/grad_norm/{name}"] = sum(norms) / len(norms)
            moved = _norm([p.detach() - p0 for p, p0 in zip(params, self.initial[name], strict=True)])
            out[f"diag/update_norm/{name}"] = moved
            start = _norm(self.initial[name])
            if start > 0:
                out[f"diag/rel_change/{name}"] = moved / start
        return out


def join_states(states: Sequence[EncoderState]) -> EncoderState:
    """The states of a step's replay micro-batches as one batch, so that the state metrics cover
    every sequence of the step rather than the last micro-batch."""
    fields = zip(*((s.max, s.norm, s.num) for s in states), strict=True)
    return EncoderState(*(None if parts[0] is None else torch.cat(parts, dim=1) for parts in fields))


@torch.no_grad()
def state_metrics(encoder: ThoughtEncoder, state: EncoderState) -> dict[str, float]:
    """Per layer l: `diag/state_rms/l<l>`, the RMS of S over the batch, and (exact state update with
    global tokens) `diag/global_share/l<l>`, the mean share of the queries' attention mass on the
    global tokens. The global tokens' scores do not depend on the sequence, so their mass under
    the state's running max is recomputed here rather than carried in the state."""
    rms = state.read().double().pow(2).mean(dim=(1, 2, 3)).sqrt()
    out = {f"diag/state_rms/l{layer:02d}": float(v) for layer, v in enumerate(rms)}
    if state.norm is None or encoder.num_global == 0:
        return out
    k = torch.einsum("lnd,lda->lna", encoder.global_keys, encoder.key_proj)
    scale = math.sqrt(encoder.attention_dim)
    scores = torch.einsum("lra,lna->lrn", encoder.queries, k) / scale  # [L, r, n_g]
    mass = torch.exp(scores[:, None] - state.max[..., None]).sum(-1)  # [L, B, r]
    share = (mass / state.norm.clamp_min(1e-30)).mean(dim=(1, 2))
    out.update({f"diag/global_share/l{layer:02d}": float(v) for layer, v in enumerate(share)})
    return out


__all__ = ["ParameterDiagnostics", "join_states", "state_metrics"]
