"""Batched constant-memory generation under the bounded cache.

All sequences decode in lockstep: one prefill of the left-padded prompts, then one token per step.
Before a token would overflow the window, a block is evicted (and folded into the PTE state). The
only host syncs are the periodic "all finished?" check and streaming.

Log-probs are those of the sampled token under softmax(logits / temperature) (temperature 1 for
greedy), before any top-p / top-k truncation -- the definition TRL uses for GRPO.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..config import CacheConfig, SamplingConfig
from .adapter import refresh_casts, wide_dtype
from .attention import observing
from .attention_stats import AttentionStats
from .cache import BoundedKVCache, cache_kwarg
from .eviction import EvictionEvent, EvictionPolicy, ScoredEviction
from .fold import StateFolder
from .graph import DecodeStep

SYNC_EVERY = 16  # steps between "all sequences finished?" checks (each is a host sync)


@dataclass
class RawRollout:
    """Untruncated lockstep output: tokens/logprobs [B, steps]. `events`
    are the batch's eviction events; under a scored policy `layer_tokens` [events, layers, B, E] holds
    what each layer of each sequence evicted (the events' `tokens` are then empty)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    events: list[EvictionEvent]
    prompt_lengths: list[int]
    cache_bytes: int
    seconds: float
    layer_tokens: torch.Tensor | None = None
    attention_stats: AttentionStats | None = None

    def row_events(self, row: int) -> list[EvictionEvent]:
        """The eviction log of sequence `row`."""
        if self.layer_tokens is None:
            return list(self.events)
        mine = self.layer_tokens[:, :, row].tolist()
        return [EvictionEvent(e.step, (), tuple(map(tuple, layers)))
                for e, layers in zip(self.events, mine, strict=True)]


def pad_prompts(prompts: list[list[int]], pad_id: int, device: torch.device,
                width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to the longest (or to `width` if wider): ids [B, P] and validity [B, P]."""
    width = max(width, *(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p) :] = True
    return ids.to(device), valid.to(device)


def right_pad(rows: Sequence[Sequence[float]] | Sequence[torch.Tensor], width: int, fill: float = 0,
              dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Ragged rows (token ids, log-probs) right-padded with `fill` into one [len(rows), width] tensor."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        values = torch.as_tensor(row, dtype=dtype)
        out[i, : len(values)] = values
    return out


def compiled_prompt_width(longest: int) -> int:
    """The prompt width a compiled decode step is built for. The step is specialised to the cache's
    shape (prompt slots + window), and training brings new prompt lengths every batch: padding to a
    power of two (at least 16) lets nearby lengths share one compilation."""
    return max(16, 1 << (longest - 1).bit_length())


def prompt_positions(valid: torch.Tensor) -> torch.Tensor:
    """True positions of left-padded prompt tokens (padding gets 0; it is masked anyway)."""
    return (valid.long().cumsum(-1) - 1).clamp_min(0)


def sample(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token per row; returns (tokens [B], logprobs [B]) with logprobs under the
    untruncated tempered distribution."""
    logits = logits.to(wide_dtype(logits.dtype))
    if cfg.temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / cfg.temperature
    logprobs = torch.log_softmax(scaled, -1)
    filtered = scaled
    if cfg.top_k and cfg.top_k < filtered.shape[-1]:
        kth = filtered.topk(cfg.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        filtered = filtered.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    tokens = torch.multinomial(filtered.softmax(-1), 1, generator=generator)[:, 0]
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


class Streamer(Protocol):
    """What `generate(streamer=...)` accepts: transformers' TextStreamer fits."""

    def put(self, value: torch.Tensor) -> None: ...
    def end(self) -> None: ...


@torch.no_grad()
def rollout(
    model: nn.Module,
    folder: StateFolder,
    prompts: list[list[int]],
    cache_cfg: CacheConfig,
    sampling: SamplingConfig,
    eos_ids: set[int],
    pad_id: int,
    streamer: Streamer | None = None,
    eviction_policy: EvictionPolicy | ScoredEviction | None = None,
    stop_check=None,
    cuda_graph: bool = False,
    compile_step: bool = False,
    lockstep: Callable[[bool], bool] | None = None,
    calibration: bool = False,
    forced: torch.Tensor | None = None,
) -> RawRollout:
    """Decode `prompts` (token lists) in lockstep under the bounded cache.

    `stop_check(tokens [B, t]) -> bool tensor [B]` marks extra finished rows at sync points
    (stop strings). Finished rows keep decoding padding so shapes stay static. `cuda_graph`
    captures the decode step once and replays it (CUDA only); `compile_step` runs it through
    torch.compile first. `lockstep(all_done_here) -> all_done_everywhere` makes processes whose
    forward passes are collectives (FSDP) stop at the same step. `calibration=True` also gathers
    the per-head attention peaks (`RawRollout.attention_stats.peak`). `forced` [B, max_new_tokens]
    feeds those tokens instead of sampling (teacher forcing through the decode path: the eviction
    log a scored policy makes on given completions); their log-probs use the temperature."""
    device = next(model.parameters()).device
    width = compiled_prompt_width(max(map(len, prompts))) if compile_step else 0
    ids, valid = pad_prompts(prompts, pad_id, device, width)
    batch, n_new = ids.shape[0], sampling.max_new_tokens
    window = cache_cfg.window if cache_cfg.bounded else max(1, n_new)
    block = cache_cfg.evict_block if cache_cfg.bounded else 1
    scored = eviction_policy if isinstance(eviction_policy, ScoredEviction) and cache_cfg.bounded else None
    stats = None
    if scored is not None or calibration:
        cfg = model.config
        stats = AttentionStats(
            cfg.num_hidden_layers, batch, cfg.num_key_value_heads, ids.shape[1], window, device,
            cumulative=scored is not None and scored.cumulative,
            recent_queries=cache_cfg.observed_queries if scored is not None and scored.recent else 0,
            peak=calibration)
    cache = BoundedKVCache(model.config.num_hidden_layers, valid, window, block, scored or eviction_policy,
                           stats=stats, protect=cache_cfg.protected if scored is not None else 0)
    prompt_len = valid.sum(-1)  # true prompt lengths [B]
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    eos = torch.tensor(sorted(eos_ids), device=device)
    kw = cache_kwarg(model)

    start = time.perf_counter()
    state = folder.start(batch)
    if cuda_graph:
        folder.pin(state)
    if compile_step:
        refresh_casts(folder.wrappers, folder.dtype)  # compiled steps read these copies unchecked
    step = DecodeStep(model, cache, capture=cuda_graph, compile=compile_step)
    out = model(
        input_ids=ids, attention_mask=cache.begin_prefill(), position_ids=prompt_positions(valid),
        use_cache=True, logits_to_keep=1, **{kw: cache},
    )
    logits = out.logits[:, -1]
    tokens = torch.empty(batch, n_new, dtype=torch.long, device=device)
    logprobs = torch.empty(batch, n_new, device=device, dtype=wide_dtype(folder.dtype))
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    events, layer_tokens = [], []
    steps = 0
    with observing(model, stats):
        for t in range(n_new):
            if forced is None:
                token, lp = sample(logits, sampling, generator)
            else:
                token = forced[:, t].to(device)
                scaled = logits.to(wide_dtype(logits.dtype)) / max(sampling.temperature, 1e-30)
                lp = torch.log_softmax(scaled, -1)
                lp = lp.gather(-1, token[:, None])[:, 0]
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens[:, t], logprobs[:, t] = token, lp
            steps = t + 1
            if streamer is not None:
                streamer.put(token.cpu())
            done |= torch.isin(token, eos)
            if t == n_new - 1:
                break
            if steps % SYNC_EVERY == 0:
                if stop_check is not None:
                    done |= stop_check(tokens[:, :steps])
                finished = bool(done.all())
                if lockstep(finished) if lockstep is not None else finished:
                    break
            if cache.window.full and scored is not None:
                evicted, keys, values = cache.evict_scored(t)
                events.append(EvictionEvent(t, ()))
                layer_tokens.append(evicted)
                state = folder.fold(state, keys, values, prompt_len[None, :, None] + evicted)
            elif cache.window.full:
                event, slots = cache.evict(t)
                events.append(event)
                if folder.active:
                    keys, values = cache.gather(slots)
                    positions = prompt_len[:, None] + torch.tensor(event.tokens, device=device)[None]
                    state = folder.fold(state, keys, values, positions)
            logits = step(token, prompt_len + t, cache.admit(t))
    if streamer is not None:
        streamer.end()
    folder.apply(None)
    elapsed = time.perf_counter() - start
    return RawRollout(
        tokens=tokens[:, :steps].cpu(), logprobs=logprobs[:, :steps].cpu(), events=events,
        prompt_lengths=[len(p) for p in prompts], cache_bytes=cache.nbytes(), seconds=elapsed,
        layer_tokens=torch.stack(layer_tokens).cpu() if layer_tokens else None,
        attention_stats=stats if calibration else None,
    )
