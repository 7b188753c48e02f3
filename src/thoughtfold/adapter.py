"""Low-rank adapters on the target linears (DESIGN.md §1), attached by module replacement.

  y = W x + (alpha / r) * A (S (B x)),   A: d_out x r (zero-init), B: r x d_in

`lora` mode fixes S = I (a static LoRA, PEFT-equivalent: B is PEFT's lora_A, A is its lora_B);
`pte` mode reads a per-sequence state S [batch, r, r] that the engine sets at every eviction event.
A zero-init A makes every mode exactly the base model at step 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from .config import AdapterConfig
from .errors import ConfigError

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class LowRankLinear(nn.Module):
    """A frozen base linear plus a (possibly state-modulated) low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dynamic: bool, layer: int):
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.dynamic = dynamic
        self.layer = layer
        dev = base.weight.device
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))  # PEFT's lora_A init
        self.state: torch.Tensor | None = None  # [batch, r, r] in pte mode
        self.enabled = True
        self._cast: tuple | None = None  # (key, down, up): no-grad copies in the activations' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        down, up = self._weights(x.dtype)
        u = F.linear(x, down)
        if self.dynamic:
            if self.state is None:
                raise RuntimeError("pte adapter called without a state: run it through a Policy")
            u = u @ self.state.to(x.dtype).transpose(-1, -2)  # [B, T, r] @ [B, r, r]
        # y + scaling * u A^T as one kernel: a decode step runs this for every target linear
        out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), up.t(), alpha=self.scaling)
        return out.view_as(y)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """B and A in the activations' dtype. Without autograd (rollouts) the cast copies are kept
        until the parameters change -- an optimizer step or a load bumps their version -- so a
        decode step does not re-cast every adapter."""
        down, up = self.lora_down, self.lora_up
        if down.dtype == dtype:
            return down, up
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # compiled: inductor fuses the cast
            return down.to(dtype), up.to(dtype)
        key = (dtype, down._version, up._version, down.data_ptr(), up.data_ptr())
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, down.detach().to(dtype), up.detach().to(dtype))
        return self._cast[1], self._cast[2]


def attach_adapters(model: nn.Module, config: AdapterConfig) -> list[LowRankLinear]:
    """Replace every target linear inside the decoder layers by a `LowRankLinear`.
    Returns the wrappers in model order (empty for mode 'none')."""
    if config.mode == "none":
        return []
    targets = set(config.target_modules)
    found: list[tuple[nn.Module, str, nn.Linear, int]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}"
            match = _LAYER_INDEX.search(full + ".")
            if child_name in targets and isinstance(child, nn.Linear) and match:
                found.append((module, child_name, child, int(match.group(1))))
    missing = targets - {child_name for _, child_name, _, _ in found}
    if missing:
        raise ConfigError(
            f"target_modules {sorted(missing)} match no linear layer of this model; "
            f"choose from the names of its attention/MLP linears (e.g. q_proj, up_proj)"
        )
    wrappers = []
    for parent, child_name, child, layer in found:
        wrapper = LowRankLinear(child, config.rank, config.scaling, config.mode == "pte", layer)
        setattr(parent, child_name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def detach_adapters(model: nn.Module, wrappers: list[LowRankLinear]) -> None:
    """Undo `attach_adapters`: put each wrapper's base linear back in its place."""
    wrapped = {id(w) for w in wrappers}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in wrapped:
                setattr(parent, name, child.base)


def set_states(wrappers: list[LowRankLinear], states: torch.Tensor | None) -> None:
    """Hand each dynamic wrapper its layer's state: `states` is [layers, batch, r, r]."""
    for w in wrappers:
        if w.dynamic:
            w.state = None if states is None else states[w.layer]


@contextmanager
def adapters_disabled(wrappers: list[LowRankLinear]) -> Iterator[None]:
    """Run the base model (the KL reference) without detaching the wrappers."""
    previous = [w.enabled for w in wrappers]
    for w in wrappers:
        w.enabled = False
    try:
        yield
    finally:
        for w, p in zip(wrappers, previous, strict=True):
            w.enabled = p


def adapter_state_dict(wrappers: list[LowRankLinear], model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors, keyed by their module path in the model."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for w in wrappers:
        out[f"{names[id(w)]}.lora_down"] = w.lora_down.detach()
        out[f"{names[id(w)]}.lora_up"] = w.lora_up.detach()
    return out
