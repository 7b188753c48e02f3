"""Low-rank adapters on the target linears (docs/design.md §1), attached by module replacement.

  y = W x + (alpha / r) * B (M (A x)),   A: r x d_in (`lora_down`), B: d_out x r (`lora_up`, zero-init)

The letters are PEFT's: A is its lora_A (the down-projection), B its lora_B (the up-projection).
`lora` mode fixes M = I (a static LoRA, PEFT-equivalent); `pte` mode reads a per-sequence state
S [batch, r, r] that the engine sets at every eviction event, with M = I + S (`residual`: LoRA_c
plus the state's contribution) or M = S (the paper's form). A zero-init B makes every mode exactly
the base model at step 0.

Linears that read the same input (q/k/v; gate/up) share an `AdapterGroup`: their A's run as one
GEMM and the layer's state is applied once, so a pte decode step launches 4 down-projections and 4
state products per layer instead of 7 of each (docs/design.md §3: a decode step is launch- and
bandwidth-bound, and PTE should add little to it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from ..config import AdapterConfig
from ..errors import ConfigError

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# sibling linears that every supported family (Llama, Qwen2, Qwen3) calls on the same tensor
SHARED_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision model, else the model's own dtype (float32, float64): the dtype
    of the trainable tensors, the encoder state and log-softmax. Half-precision updates would round
    away; a float64 model stays float64 end to end (exactness checks)."""
    return torch.promote_types(dtype, torch.float32)


class LowRankLinear(nn.Module):
    """A frozen base linear plus a (possibly state-modulated) low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dynamic: bool, layer: int,
                 residual: bool = False):
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.dynamic = dynamic
        self.residual = residual  # dynamic only: M = I + S rather than S
        self.layer = layer
        kw = {"device": base.weight.device, "dtype": wide_dtype(base.weight.dtype)}
        self.lora_down = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_up = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))  # PEFT's lora_A init
        self.state: torch.Tensor | None = None  # [batch, r, r] in pte mode
        self.enabled = True
        self._cast: tuple | None = None  # see `_stacked`
        self.group = AdapterGroup([self])  # `attach_adapters` joins siblings that share an input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        u = self.group.project(x, self)
        # y + scaling * u B^T as one kernel: a decode step runs this for every target linear
        out = torch.addmm(y.reshape(-1, y.shape[-1]), u.reshape(-1, u.shape[-1]), self.up(x.dtype).t(),
                          alpha=self.scaling)
        return out.view_as(y)

    def up(self, dtype: torch.dtype) -> torch.Tensor:
        """B (the up-projection) in `dtype` (see `_stacked`)."""
        return _stacked(self, (self.lora_up,), dtype)


def _stacked(owner, params: tuple[nn.Parameter, ...], dtype: torch.dtype) -> torch.Tensor:
    """`params` cast to `dtype` and stacked along dim 0. Without autograd (rollouts) a copy is kept
    on `owner._cast` until a parameter changes -- an optimizer step or a load bumps its version --
    so a decode step does not re-cast or re-stack every adapter. With autograd it is recomputed (it
    must be differentiable). Compiled decode steps read the copy that `refresh_casts` made before
    the rollout: recomputing it in the graph would add a cast kernel per adapter to every step."""
    if len(params) == 1 and params[0].dtype == dtype:
        return params[0]
    if torch.is_grad_enabled():
        cast = [p.to(dtype) for p in params]
        return cast[0] if len(cast) == 1 else torch.cat(cast)
    if torch.compiler.is_compiling():  # only the tensor is read: guards on the key would recompile
        if owner._cast is None:
            raise RuntimeError("compiled adapter forward without refresh_casts(): run it through a Policy")
        return owner._cast[1]
    key = (dtype, *((p._version, p.data_ptr()) for p in params))
    if owner._cast is None or owner._cast[0] != key:
        owner._cast = (key, torch.cat([p.detach().to(dtype) for p in params]))
    return owner._cast[1]


@torch.no_grad()
def refresh_casts(wrappers: list[LowRankLinear], dtype: torch.dtype) -> None:
    """Bring every adapter's no-grad copies (B, and the group's stacked A's) up to date for
    activations of `dtype`. A compiled decode step reads them as they are, so the rollout calls
    this before decoding (the optimizer may have changed the adapters since the last rollout)."""
    for w in wrappers:
        w.up(dtype)
        if w is w.group.members[0]:
            w.group.down(dtype)


class AdapterGroup:
    """The adapters of one layer whose linears read the same tensor. The first member called with
    a new input computes u = S A x for every member (one GEMM over the stacked A's, one state
    product); the others take their slice of it. Once each member has taken its slice the group
    lets go of the input, so nothing outlives the forward pass."""

    def __init__(self, members: list[LowRankLinear]):
        self.members = members
        self._cast: tuple | None = None
        self._input: torch.Tensor | None = None
        self._u: list[torch.Tensor] = []
        self._left = 0

    def project(self, x: torch.Tensor, member: LowRankLinear) -> torch.Tensor:
        """This member's u = S B x, [..., r]."""
        if self._input is not x:
            self._input, self._u, self._left = x, self._compute(x), len(self.members)
        u = self._u[self.members.index(member)]
        self._left -= 1
        if self._left == 0:
            self._input, self._u = None, []
        return u

    def down(self, dtype: torch.dtype) -> torch.Tensor:
        """The members' A's (down-projections) stacked, [members * r, d_in], in `dtype` (see `_stacked`)."""
        return _stacked(self, tuple(m.lora_down for m in self.members), dtype)

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        first = self.members[0]
        u = F.linear(x, self.down(x.dtype))  # [..., members * r]
        rank = first.lora_down.shape[0]
        if first.dynamic:
            if first.state is None:
                raise RuntimeError("pte adapter called without a state: run it through a Policy")
            # one state product for the whole group: [B, T * members, r] @ M^T, M = S or I + S
            rows, state_t = u.reshape(u.shape[0], -1, rank), first.state.to(x.dtype).transpose(-1, -2)
            product = torch.baddbmm(rows, rows, state_t) if first.residual else torch.bmm(rows, state_t)
            u = product.view_as(u)
        return list(u.split(rank, dim=-1))


def _targets(model: nn.Module, config: AdapterConfig) -> list[tuple[nn.Module, str, nn.Linear, int]]:
    """(parent, name, linear, layer) of every target linear inside the decoder layers."""
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
    return found


def check_adapter_size(model: nn.Module, config: AdapterConfig, encoder_size: int = 0) -> None:
    """A ConfigError, before anything is allocated, when the adapters (plus `encoder_size` encoder
    parameters) would outnumber the base model's parameters: a rank or a count of global tokens that
    large is a mistake or a damaged adapter file, and would try to allocate all of it."""
    if config.mode == "none":
        return
    size = encoder_size + sum(config.rank * (linear.in_features + linear.out_features)
                              for _, _, linear, _ in _targets(model, config))
    base = sum(p.numel() for p in model.parameters())
    if size > base:
        raise ConfigError(f"an adapter of rank {config.rank} with {config.global_tokens} global tokens would "
                          f"hold {size:,} parameters, more than the base model's {base:,}: lower the rank or "
                          "global_tokens")


def attach_adapters(model: nn.Module, config: AdapterConfig) -> list[LowRankLinear]:
    """Replace every target linear inside the decoder layers by a `LowRankLinear`.
    Returns the wrappers in model order (empty for mode 'none')."""
    if config.mode == "none":
        return []
    wrappers, groups = [], {}
    for parent, child_name, child, layer in _targets(model, config):
        wrapper = LowRankLinear(child, config.rank, config.scaling, config.mode == "pte", layer,
                                config.residual)
        setattr(parent, child_name, wrapper)
        wrappers.append(wrapper)
        shared = [i for i, names in enumerate(SHARED_INPUT) if child_name in names]
        if shared:
            groups.setdefault((id(parent), shared[0]), []).append(wrapper)
    for members in groups.values():
        group = AdapterGroup(members)
        for wrapper in members:
            wrapper.group = group
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
