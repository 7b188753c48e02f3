"""Memory-bounded replay (docs/design.md §1): teacher-forced log-probs of a rollout, recomputed with
autograd one segment at a time.

Segment 0 is the prompt plus the thought tokens fed before the first eviction; then one segment per
eviction event. A segment attends to the pinned prompt and the surviving window (K/V kept from
earlier segments, detached) and runs with the state folded from everything evicted so far. With a
`loss_fn`, backward runs after each segment, so the graph never spans more than one segment and
peak memory depends on the window, not on the completion length. How gradients cross eviction
events is `backprop`: "state" (the default), "truncated" or "full" (see `replay`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..config import BACKPROP, CacheConfig
from ..errors import ConfigError
from .adapter import wide_dtype
from .cache import cache_kwarg
from .encoder import EncoderState
from .eviction import EvictionEvent, affects
from .fold import StateFolder
from .rollout import pad_prompts, prompt_positions, right_pad

LossFn = Callable[[torch.Tensor, int, int, list[int]], torch.Tensor]
"""loss_fn(logprobs, start, end, rows) -> scalar, for completion tokens [start, end) of the
sequences `rows` (indices into the replayed batch, one per logprobs row). `logprobs` is [b, m], the
log-probs of the given tokens, or with `loss_input="distribution"` [b, m, vocab], the full
next-token log-distributions (a distillation loss). Sequences whose eviction logs differ (a custom
eviction policy, rollouts made in separate chunks) are replayed group by group, so `rows` may be
any subset: index per-sequence tensors with it."""

LOSS_INPUTS = ("tokens", "distribution")

DistributionFn = Callable[[torch.Tensor, int, int, list[int]], None]
"""distribution_fn(logprobs [b, m, vocab], start, end, rows): the full next-token log-distribution
(detached) at completion tokens [start, end) of the sequences `rows`, e.g. to compare a bounded policy
with the full-cache model token by token."""

LOGPROB_CHUNK = 1 << 22
"""Logits (tokens x vocabulary) that `token_logprobs` widens to float32 at a time: 16 MB."""


class _TokenLogProbs(torch.autograd.Function):
    """log softmax(logits / T) at the given tokens, chunk by chunk over tokens: the full float32
    log-softmax is never materialised. Backward saves only the logits (in their own dtype) and each
    token's log-normaliser, and recomputes softmax chunk by chunk: d lp / d logits = (onehot - p) / T."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, dtype: torch.dtype,
                chunk: int) -> torch.Tensor:
        flat, index = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        out = torch.empty(index.shape[0], dtype=dtype, device=logits.device)
        norm = torch.empty_like(out)
        for a in range(0, flat.shape[0], chunk):
            x = flat[a : a + chunk].to(dtype) / temperature
            norm[a : a + chunk] = x.logsumexp(-1)
            out[a : a + chunk] = x.gather(-1, index[a : a + chunk])[:, 0] - norm[a : a + chunk]
        ctx.save_for_backward(logits, tokens, norm)
        ctx.temperature, ctx.dtype, ctx.chunk = temperature, dtype, chunk
        return out.view(tokens.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, tokens, norm = ctx.saved_tensors
        flat, index = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1, 1)
        grad = grad.reshape(-1, 1).to(ctx.dtype)
        out = torch.empty_like(flat)
        for a in range(0, flat.shape[0], ctx.chunk):
            x = flat[a : a + ctx.chunk].to(ctx.dtype) / ctx.temperature
            g = grad[a : a + ctx.chunk]
            d = (x - norm[a : a + ctx.chunk, None]).exp_().mul_(-g)
            out[a : a + ctx.chunk] = d.scatter_add_(-1, index[a : a + ctx.chunk], g) / ctx.temperature
        return out.view_as(logits), None, None, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, dtype: torch.dtype,
                   chunk: int | None = None) -> torch.Tensor:
    """log softmax(logits / temperature) [..., V] at `tokens` [...], in `dtype` (differentiable), with at
    most `chunk` tokens' logits widened at a time (default: LOGPROB_CHUNK elements' worth), as TRL's
    selective log-softmax: the update's memory stays bounded in the vocabulary."""
    chunk = chunk or max(1, LOGPROB_CHUNK // logits.shape[-1])
    return _TokenLogProbs.apply(logits, tokens, temperature, dtype, chunk)


def segment_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, dtype: torch.dtype,
                     full: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A segment's log-probs of `tokens`, and with `full` its whole next-token log-distributions
    [..., V] (for a distribution loss or callback); without, those are never materialised."""
    if not full:
        return token_logprobs(logits, tokens, temperature, dtype), None
    logprobs = torch.log_softmax(logits.to(dtype) / temperature, -1)
    return logprobs.gather(-1, tokens[..., None])[..., 0], logprobs


class _SegmentLayer(CacheLayerMixin):
    """Context K/V from earlier segments plus the current segment's own K/V."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor | None, values: torch.Tensor | None):
        super().__init__()
        self.keys, self.values = keys, values
        self.new_keys: torch.Tensor | None = None
        self.new_values: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:  # context is given up front
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.new_keys, self.new_values = key_states, value_states
        if self.keys is None:
            return key_states, value_states
        return torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (0 if self.keys is None else self.keys.shape[2]) + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def get_max_length(self) -> int:
        return -1


def default_schedule(length: int, cache: CacheConfig) -> list[EvictionEvent]:
    """The oldest-block eviction log a rollout of `length` tokens produces (a pure function of
    W, rho and the step)."""
    if not cache.bounded:
        return []
    w, e = cache.window, cache.evict_block
    return [EvictionEvent(step=s, tokens=tuple(range(s - w, s - w + e))) for s in range(w, length, e)
            if affects(s, length)]


def _schedule_groups(logs: Sequence[Sequence[EvictionEvent]]) -> list[tuple[list[int], list[int]]]:
    """Sequences that can be replayed together: (rows, the longest list of event steps) where every
    row's steps are a prefix of it. Every sequence evicts at W, W + E, ... of its own steps, so the
    rows of a rollout form one group, whatever tokens each evicted and whichever slot decoded it;
    events past a row's end do not change its log-probs."""
    groups: list[tuple[list[int], list[int]]] = []
    for i, log in enumerate(logs):
        steps = [e.step for e in log]
        for k, (rows, longest) in enumerate(groups):
            shorter, longer = sorted((steps, longest), key=len)
            if longer[: len(shorter)] == shorter:
                rows.append(i)
                groups[k] = (rows, longer)
                break
        else:
            groups.append(([i], steps))
    return groups


def _event_tokens(logs: Sequence[Sequence[EvictionEvent]], k: int, num_layers: int,
                  device: torch.device) -> torch.Tensor:
    """What event k evicts from each layer of each row [layers, rows, E]; -1 for a row whose log
    ended before event k (it evicts its oldest tokens: past its end, what it keeps does not matter)."""
    events = [log[k] if k < len(log) else None for log in logs]
    first = next(e for e in events if e is not None)
    if all(e == first and e.layers is None for e in events):  # one choice for the whole batch
        return torch.tensor(first.tokens, device=device).expand(num_layers, len(events), -1)
    width = len(first.by_layer(num_layers)[0])
    rows = [torch.full((num_layers, width), -1) if e is None else torch.tensor(e.by_layer(num_layers))
            for e in events]
    return torch.stack(rows, 1).to(device)


class _Context:
    """K/V the next segment attends to: the padded prompt, then the surviving thought tokens (which
    may differ per layer and sequence, under a scored eviction policy; ascending in every row)."""

    def __init__(self, batch: int, num_layers: int, device: torch.device):
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.thought = torch.zeros(num_layers, batch, 0, dtype=torch.long, device=device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def cache(self, num_layers: int) -> Cache:
        if not self.keys:
            return Cache(layers=[_SegmentLayer(None, None) for _ in range(num_layers)])
        return Cache(layers=[_SegmentLayer(k, v) for k, v in zip(self.keys, self.values, strict=True)])

    def append(self, cache: Cache, thought: range, valid: torch.Tensor, detach: bool) -> None:
        """Keep the segment's own K/V (detached for truncated backprop) for later segments: its
        `thought` tokens, after the prompt when this is the first segment."""
        new_k = [layer.new_keys.detach() if detach else layer.new_keys for layer in cache.layers]
        new_v = [layer.new_values.detach() if detach else layer.new_values for layer in cache.layers]
        if self.keys:
            new_k = [torch.cat([a, b], 2) for a, b in zip(self.keys, new_k, strict=True)]
            new_v = [torch.cat([a, b], 2) for a, b in zip(self.values, new_v, strict=True)]
        self.keys, self.values = new_k, new_v
        self.valid = torch.cat([self.valid, valid], 1)
        added = torch.arange(thought.start, thought.stop, device=self.valid.device)
        self.thought = torch.cat([self.thought, added.expand(*self.thought.shape[:2], -1)], -1)

    def evict(self, tokens: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop `tokens` [L, B, E] (-1 rows: the oldest E); returns their K/V stacked over layers
        [L, B, H, E, D] and the thought tokens that left [L, B, E]."""
        size, block = self.thought.shape[-1], tokens.shape[-1]
        gone = (self.thought[..., :, None] == tokens[..., None, :]).any(-1)
        oldest = torch.arange(size, device=gone.device) < block
        gone = torch.where((tokens < 0).all(-1, keepdim=True), oldest, gone)
        if bool((gone.sum(-1) != block).any()):
            raise ConfigError(f"the eviction log names tokens that are not in the cache at step {step}")
        out_idx = gone.int().argsort(dim=-1, descending=True, stable=True)[..., :block]
        keep_idx = (~gone).int().argsort(dim=-1, descending=True, stable=True)[..., : size - block]
        prompt = self.valid.shape[1] - size
        keys, values = [], []
        for buffers, out in ((self.keys, keys), (self.values, values)):
            for layer, cached in enumerate(buffers):
                thought = cached[:, :, prompt:]
                shape = (*thought.shape[:2], -1, thought.shape[-1])
                out.append(thought.gather(2, out_idx[layer][:, None, :, None].expand(shape)))
                kept = thought.gather(2, keep_idx[layer][:, None, :, None].expand(shape))
                buffers[layer] = torch.cat([cached[:, :, :prompt], kept], 2)
        self.valid = self.valid[:, : self.valid.shape[1] - block]
        evicted = self.thought.gather(-1, out_idx)
        self.thought = self.thought.gather(-1, keep_idx)
        return torch.stack(keys), torch.stack(values), evicted


def replay(
    model: nn.Module,
    folder: StateFolder,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    cache_cfg: CacheConfig,
    eviction_log: Sequence[Sequence[EvictionEvent]] | None = None,
    loss_fn: LossFn | None = None,
    temperature: float = 1.0,
    backprop: str = "state",
    pad_id: int = 0,
    min_length: int = 0,
    distribution_fn: DistributionFn | None = None,
    loss_input: str = "tokens",
) -> list[torch.Tensor]:
    """Per-token log-probs (detached, one tensor per sequence) of `completion_ids` given the prompts,
    under the same cache and state history as the rollout that produced them.

    Gradients (with `loss_fn`) cross eviction events as `backprop` says (see BACKPROP): "state"
    (default; backprop through time over the encoder states, cached K/V detached, backward still per
    segment; extra memory: the evicted K/V, no activations), "truncated" or "full" (one graph over
    everything). `min_length` pads the batch (with
    `pad_id`, after every sequence) to at least that many tokens and replays the default schedule
    over it: processes of a sharded model then run the same segments whatever their own lengths.
    `distribution_fn` receives each segment's full next-token log-distributions; `loss_input` says
    what `loss_fn` receives (see LossFn)."""
    if backprop not in BACKPROP:
        raise ConfigError(f"backprop must be one of {', '.join(BACKPROP)}, got {backprop!r}")
    if loss_input not in LOSS_INPUTS:
        raise ConfigError(f"loss_input must be one of {', '.join(LOSS_INPUTS)}, got {loss_input!r}")
    if len(prompt_ids) != len(completion_ids):
        raise ConfigError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if any(len(c) == 0 for c in completion_ids):
        raise ConfigError("every completion needs at least one token")
    logs = eviction_log
    if logs is None:
        logs = [default_schedule(max(len(c), min_length), cache_cfg) for c in completion_ids]
    elif min_length > max(len(c) for c in completion_ids):
        raise ConfigError("min_length pads with the default eviction schedule: pass eviction_log=None")
    if len(logs) != len(completion_ids):
        raise ConfigError(f"{len(logs)} eviction logs for {len(completion_ids)} completions")
    out: dict[int, torch.Tensor] = {}
    for rows, steps in _schedule_groups(logs):
        chain = _StateChain(folder) if backprop == "state" and loss_fn is not None and folder.active else None
        part = _replay_batch(
            model, chain or folder, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows], steps,
            [logs[i] for i in rows], rows, loss_fn, temperature, backprop == "full", pad_id, min_length,
            distribution_fn, loss_input == "distribution",
        )
        if chain is not None:
            chain.backward()
        out.update(zip(rows, part, strict=True))
    return [out[i] for i in range(len(completion_ids))]


def _grad_leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_()


class _StateChain:
    """Stands in for the `StateFolder` during a replay to give the encoder the exact gradient through
    the chain S_0 -> S_1 -> ... while backward still runs per segment.

    Pass 1 (the segment-wise replay): every state a segment reads is a fresh leaf, so each segment's
    backward leaves dL/dS_k in the leaf's .grad. Pass 2 (`backward`): recompute the chain with
    autograd from the recorded evicted K/V and backpropagate sum_k <S_k, dL/dS_k>."""

    def __init__(self, folder: StateFolder):
        self.folder = folder
        self.leaves: list[EncoderState] = []
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.batch = 0

    active = True

    def _leaf(self, state: EncoderState) -> EncoderState:
        leaf = EncoderState(state.max, _grad_leaf(state.norm), _grad_leaf(state.num))
        self.leaves.append(leaf)
        self.folder.apply(leaf)
        return leaf

    def start(self, batch: int) -> EncoderState:
        self.batch = batch
        with torch.no_grad():
            state = self.folder.start(batch)
        return self._leaf(state)  # outside no_grad: the adapters' S must carry the leaf's graph

    def fold(self, state: EncoderState, keys: torch.Tensor, values: torch.Tensor,
             positions: torch.Tensor) -> EncoderState:
        self.blocks.append((keys.detach(), values.detach(), positions))
        with torch.no_grad():
            state = self.folder.fold(state, keys, values, positions)
        return self._leaf(state)

    def apply(self, state: EncoderState | None) -> None:
        self.folder.apply(state)

    def backward(self) -> None:
        state, total = self.folder.encoder.initial_state(self.batch), None
        for k, leaf in enumerate(self.leaves):
            if k > 0:
                state = self.folder.fold(state, *self.blocks[k - 1])
            norm_grad = None if leaf.norm is None else leaf.norm.grad
            for mine, grad in ((state.num, leaf.num.grad), (state.norm, norm_grad)):
                if grad is not None and mine.requires_grad:
                    total = (mine * grad).sum() if total is None else total + (mine * grad).sum()
        self.folder.apply(None)
        if total is not None:
            total.backward()


def _replay_batch(
    model: nn.Module,
    folder: StateFolder,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    steps: list[int],
    logs: Sequence[Sequence[EvictionEvent]],
    rows: list[int],
    loss_fn: LossFn | None,
    temperature: float,
    full_backprop: bool,
    pad_id: int,
    min_length: int = 0,
    distribution_fn: DistributionFn | None = None,
    distribution_loss: bool = False,
) -> list[torch.Tensor]:
    """Replay sequences that share one eviction schedule (a lockstep batch): events at `steps`, each
    row evicting what its own log says; `rows`: their indices in the caller's batch, for `loss_fn`."""
    first_param = next(model.parameters())
    device, dtype = first_param.device, wide_dtype(first_param.dtype)
    ids, valid = pad_prompts([list(p) for p in prompt_ids], pad_id, device)
    batch = ids.shape[0]
    n = max(min_length, *(len(c) for c in completion_ids))
    comp = right_pad(completion_ids, n, pad_id).to(device)
    plen = valid.sum(-1)
    kw, num_layers = cache_kwarg(model), model.config.num_hidden_layers
    bounds = [step for step in steps if affects(step, n)]
    starts, ends = [0, *bounds], [*bounds, n - 1]  # thought tokens fed in each segment

    context = _Context(batch, num_layers, device)
    state = folder.start(batch)
    out_lp = torch.empty(batch, n, device=device, dtype=dtype)
    total = None
    for k, (a, b) in enumerate(zip(starts, ends, strict=True)):
        if k > 0:
            keys, values, gone = context.evict(_event_tokens(logs, k - 1, num_layers, device), a)
            # [B, E] when every layer evicted the same tokens, as the rollout folds them
            positions = (plen[:, None] + gone[0] if bool((gone == gone[:1]).all())
                         else plen[None, :, None] + gone)
            state = folder.fold(state if full_backprop or state is None else state.detach(), keys, values,
                                positions)
        thought = comp[:, a:b]
        seg_ids = torch.cat([ids, thought], 1) if k == 0 else thought
        seg_pos = plen[:, None] + torch.arange(a, b, device=device)[None]
        if k == 0:
            seg_pos = torch.cat([prompt_positions(valid), seg_pos], 1)
        m = seg_ids.shape[1]
        own = torch.ones(m, m, dtype=torch.bool, device=device).tril()[None].expand(batch, m, m)
        if k == 0:  # padding keys are invisible; a padding query sees itself only
            keys_valid = torch.cat([valid, torch.ones(batch, b - a, dtype=torch.bool, device=device)], 1)
            own = own & keys_valid[:, None]
            own = own | torch.eye(m, dtype=torch.bool, device=device)[None]
        mask = torch.cat([context.valid[:, None].expand(batch, m, -1), own], -1)[:, None]
        cache = context.cache(num_layers)
        # thought token j predicts completion[j + 1]; segment 0 also predicts completion[0] from the prompt
        first = a if k == 0 else a + 1
        out = model(input_ids=seg_ids, attention_mask=mask, position_ids=seg_pos, use_cache=True,
                    logits_to_keep=b + 1 - first, **{kw: cache})
        lp, logprobs = segment_logprobs(out.logits, comp[:, first : b + 1], temperature, dtype,
                                        full=distribution_loss or distribution_fn is not None)
        out_lp[:, first : b + 1] = lp.detach()
        if distribution_fn is not None:
            distribution_fn(logprobs.detach(), first, b + 1, rows)
        loss_input = logprobs if distribution_loss else lp
        del out, logprobs
        new_valid = torch.ones(batch, b - a, dtype=torch.bool, device=device)
        if k == 0:
            new_valid = torch.cat([valid, new_valid], 1)
        context.append(cache, range(a, b), new_valid, detach=not full_backprop)
        if loss_fn is not None:
            loss = loss_fn(loss_input, first, b + 1, rows)
            if full_backprop:
                total = loss if total is None else total + loss
            elif loss.requires_grad:
                loss.backward()
    if total is not None and total.requires_grad:
        total.backward()
    folder.apply(None)
    return [out_lp[i, : len(c)].cpu() for i, c in enumerate(completion_ids)]
