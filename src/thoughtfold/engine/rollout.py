"""Constant-memory generation under the bounded cache, with continuous batching (docs/design.md §1.1,
§3).

A fixed number of slots decode together, one token each per step, each slot holding one sequence on
its own clock. When a sequence finishes (EOS, a stop string, its token budget) its slot takes the
next waiting prompt: one prefill writes the admitted prompts' pinned regions, their windows and PTE
states start empty, and the other slots go on decoding. Before a token would overflow a sequence's
window, a block is evicted and folded into its state at that sequence's own step. So every sequence
computes what it would alone, and samples from its own random stream: results do not depend on the
number of slots. Shapes stay static (the decode step of B slots is captured once as a CUDA graph);
the host waits for the device only at sync points -- every SYNC_EVERY steps, when a sequence reaches
its token budget, and when an asynchronous copy of the done flags shows that one ended -- and to
stream.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..config import CacheConfig, SamplingConfig
from ..errors import ConfigError
from .adapter import refresh_casts, wide_dtype
from .attention import observing
from .attention_stats import AttentionStats
from .cache import BoundedKVCache, cache_kwarg
from .eviction import EvictionEvent, EvictionPolicy, ScoredEviction
from .fold import StateFolder
from .graph import DecodeStep
from .sampling import TokenChooser
from .slots import SYNC_EVERY, DonePeek, Finished, SlotOutputs, SlotTable

STOP_TAIL = 64  # how many of a sequence's last tokens a stop check sees

StopCheck = Callable[[list[list[int]]], list[bool]]
"""stop_check(tails) -> ended: given the last STOP_TAIL tokens of unfinished sequences, which of them
end there (stop strings)."""


class Streamer(Protocol):
    """What `generate(streamer=...)` accepts: transformers' TextStreamer fits."""

    def put(self, value: torch.Tensor) -> None: ...
    def end(self) -> None: ...


@dataclass
class RolloutOptions:
    """How a rollout runs (what it samples is its SamplingConfig).

    `slots`: how many sequences decode at once (None: every prompt, static batching); the other
    prompts wait in a queue. `eos_ids` end a sequence; `pad_id` pads prompts and finished slots.
    `stop_check` ends more sequences at sync points. `cuda_graph` captures the decode step once (CUDA
    only), `compile_step` runs it through torch.compile first. `lockstep(done_here) -> done_everywhere`
    keeps processes whose forward passes are collectives (FSDP) running the same passes: a process
    with nothing left decodes idle steps and joins the others' prefills. `calibration` gathers the
    per-head attention peaks; `forced` [prompts, max_new_tokens] feeds those tokens instead of sampling
    (teacher forcing through the decode path)."""

    eos_ids: frozenset[int] | set[int] = frozenset()
    pad_id: int = 0
    slots: int | None = None
    eviction_policy: EvictionPolicy | ScoredEviction | None = None
    stop_check: StopCheck | None = None
    streamer: Streamer | None = None
    lockstep: Callable[[bool], bool] | None = None
    cuda_graph: bool = False
    compile_step: bool = False
    calibration: bool = False
    forced: torch.Tensor | None = None

    def __post_init__(self) -> None:
        slots = self.slots
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise ConfigError(f"slots must be an integer >= 1 or None (every prompt at once), got {slots!r}")


@dataclass
class RawRollout:
    """Per prompt (lists indexed like the prompts): the tokens and log-probs generated until the
    sequence was seen finished (after an EOS: padding) and its eviction log (per layer under a scored
    policy). `steps` rounds of `slots` slots; `prefills` passes."""

    tokens: list[torch.Tensor]
    logprobs: list[torch.Tensor]
    logs: list[list[EvictionEvent]]
    prompt_lengths: list[int]
    cache_bytes: int
    seconds: float
    steps: int
    slots: int
    prefills: int
    attention_stats: AttentionStats | None = None


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


def attention_stats(config, batch: int, cache_cfg: CacheConfig, scored: ScoredEviction | None,
                    calibration: bool, prompt_slots: int, window: int,
                    device: torch.device) -> AttentionStats | None:
    """The attention statistics the decode step gathers: what a scored policy reads, and the per-head
    peaks of a calibration pass (None: neither is needed)."""
    if scored is None and not calibration:
        return None
    recent = cache_cfg.observed_queries if scored is not None and scored.recent else 0
    return AttentionStats(config.num_hidden_layers, batch, config.num_key_value_heads, prompt_slots, window,
                          device, cumulative=scored is not None and scored.cumulative, recent_queries=recent,
                          peak=calibration)


class _Slots:
    """One rollout's running state: the slots' cache, PTE state, outputs and host bookkeeping."""

    def __init__(self, model: nn.Module, folder: StateFolder, prompts: list[list[int]],
                 cache_cfg: CacheConfig, sampling: SamplingConfig, options: RolloutOptions):
        self.model, self.folder, self.prompts, self.options = model, folder, prompts, options
        self.device = next(model.parameters()).device
        self.n_new = sampling.max_new_tokens
        self.table = SlotTable(len(prompts), options.slots, self.n_new, cache_cfg)
        batch, longest = self.table.size, max(map(len, prompts))
        self.width = compiled_prompt_width(longest) if options.compile_step else longest
        window = cache_cfg.window if cache_cfg.bounded else self.n_new
        policy = options.eviction_policy if cache_cfg.bounded else None
        scored = policy if isinstance(policy, ScoredEviction) else None
        self.stats = attention_stats(model.config, batch, cache_cfg, scored, options.calibration, self.width,
                                     window, self.device)
        block = cache_cfg.evict_block if cache_cfg.bounded else 1
        protect = cache_cfg.protected if scored is not None else 0
        self.cache = BoundedKVCache(model.config.num_hidden_layers, batch, self.width, window, block,
                                    self.device, policy, self.stats, protect)
        self.chooser = TokenChooser(sampling, batch, self.device, options.forced)
        self.outputs = SlotOutputs(batch, self.n_new + SYNC_EVERY, self.device, wide_dtype(folder.dtype))
        self.done = torch.ones(batch, dtype=torch.bool, device=self.device)
        self.peek = DonePeek(self.done)
        self.eos = torch.tensor(sorted(options.eos_ids), dtype=torch.long, device=self.device)
        self.finished: list[Finished] = []
        self.prefills = 0
        self.state = folder.start(batch)
        if options.cuda_graph:
            folder.pin(self.state)
        if options.compile_step:
            refresh_casts(folder.wrappers, folder.dtype)  # compiled steps read these copies unchecked

    def choose(self, logits: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Choose and record the next token of every slot (or of `slots`, whose logits these are);
        finished slots get padding."""
        clock = self.cache.clock if slots is None else self.cache.clock.index_select(0, slots)
        token, logprob = self.chooser(logits, clock, slots)
        done = self.done if slots is None else self.done.index_select(0, slots)
        token = torch.where(done, torch.full_like(token, self.options.pad_id), token)
        self.outputs.write(clock, token, logprob, slots)
        ended = done | torch.isin(token, self.eos)
        if slots is None:
            self.done.copy_(ended)
        else:
            self.done.index_copy_(0, slots, ended)
        return token

    def due(self, step: int) -> bool:
        """Whether to sync at `step`: at the table's steps, and, unless processes must agree on the
        steps (lockstep), as soon as the host sees that a sequence ended."""
        lockstep = self.options.lockstep is not None
        return self.table.due(step, lockstep) or (not lockstep and self.peek.ended(self.table))

    def start(self, slots: list[int], rows: list[int], token: torch.Tensor) -> torch.Tensor:
        """Prefill prompts `rows` into `slots`, which start afresh; returns `token` with each slot's
        first token in place of what it held."""
        idx = torch.tensor(slots, device=self.device)
        logits = self._prefill(slots, rows)
        self.state = self.folder.reset(self.state, idx)
        self.chooser.start(idx, rows)
        self.done.index_fill_(0, idx, False)
        return token.index_copy(0, idx, self.choose(logits, idx))

    def _prefill(self, slots: list[int], rows: list[int]) -> torch.Tensor:
        """One forward pass over the admitted prompts (identical ones -- a GRPO group's -- share a row)
        writing their K/V into the slots' prompt regions; returns each slot's next-token logits."""
        prompts = [tuple(self.prompts[r]) for r in rows]
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        source = [unique[p] for p in prompts]
        ids, valid = pad_prompts([list(p) for p in unique], self.options.pad_id, self.device, self.width)
        mask = self.cache.prefill(slots, source, valid)
        with self.folder.fresh(len(unique)), observing(self.model, None):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=prompt_positions(valid),
                             use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): self.cache})
        self.prefills += 1
        return out.logits[:, -1].index_select(0, torch.tensor(source, device=self.device))

    def _idle_prefill(self) -> None:
        """A forward pass that changes nothing, for a process with nothing to admit while another
        process prefills (under FSDP every process must run the same passes)."""
        with self.folder.fresh(1), observing(self.model, None):
            self.model(input_ids=torch.full((1, 1), self.options.pad_id, device=self.device), use_cache=False,
                       logits_to_keep=1)

    def sync(self, step: int, token: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Read the device: collect finished sequences, hand their slots to waiting prompts. Returns
        the tokens to feed and whether every process is done."""
        self.table.flush()
        self._collect(step)
        slots, rows = self.table.admit(step)
        lockstep = self.options.lockstep
        others_admit = lockstep is not None and not lockstep(not slots)
        if slots:
            token = self.start(slots, rows, token)
        elif others_admit:
            self._idle_prefill()
        done = self.table.finished
        return token, lockstep(done) if lockstep is not None else done

    def _collect(self, step: int) -> None:
        """Move the sequences that ended (EOS, token budget, stop string) to `finished`."""
        occupied = np.flatnonzero(self.table.occupied)
        if not len(occupied):
            return
        counts = np.minimum(self.table.clocks(step)[occupied] + 1, self.n_new)
        ended = self.done.cpu().numpy()[occupied] | (counts >= self.n_new)
        if self.options.stop_check is not None and not ended.all():
            tails = self.outputs.tails(occupied[~ended].tolist(), counts[~ended].tolist(), STOP_TAIL)
            ended[~ended] = np.asarray(self.options.stop_check(tails), dtype=bool)
        if ended.any():
            slots = occupied[ended].tolist()
            self.finished += self.outputs.read(self.table, slots, counts[ended].tolist())
            self.table.release(slots)


def evict_and_fold(run: _Slots, step: int) -> None:
    """Evict a block from every sequence whose window is full before the token it feeds at `step`
    (each on its own clock), log what left, and fold it into that sequence's PTE state."""
    slots, clocks = run.table.evicting(step)
    if not slots:
        return
    evicted = run.cache.evict(slots, clocks, gather=run.folder.active)
    run.table.record(slots, clocks, evicted)
    if run.folder.active:
        rows = None if len(slots) == run.table.size else torch.tensor(slots, device=run.device)
        run.state = run.folder.fold(run.state, evicted.keys, evicted.values, evicted.positions, rows)


@torch.no_grad()
def rollout(model: nn.Module, folder: StateFolder, prompts: list[list[int]], cache_cfg: CacheConfig,
            sampling: SamplingConfig, options: RolloutOptions | None = None) -> RawRollout:
    """Decode `prompts` (token lists) under the bounded cache, `options.slots` sequences at a time
    (see RolloutOptions); each runs until an EOS, a stop string or `sampling.max_new_tokens`."""
    options = options or RolloutOptions()
    if options.streamer is not None and len(prompts) != 1:
        raise ConfigError(f"a streamer follows one sequence, but {len(prompts)} prompts were given: pass one")
    run = _Slots(model, folder, prompts, cache_cfg, sampling, options)
    decode = DecodeStep(model, run.cache, capture=options.cuda_graph, compile=options.compile_step)
    start = time.perf_counter()
    with observing(model, run.stats):
        idle = torch.full((run.table.size,), options.pad_id, device=run.device)
        token = run.start(*run.table.admit(0), idle)
        for step in itertools.count():
            if options.streamer is not None:
                options.streamer.put(token.cpu())
            if run.due(step):
                token, finished = run.sync(step, token)
                if finished:
                    break
            evict_and_fold(run, step)
            token = run.choose(decode(token, *run.cache.admit()))
            run.peek.start(run.done, step + 1)
    if options.streamer is not None:
        options.streamer.end()
    folder.apply(None)
    elapsed = time.perf_counter() - start
    done = sorted(run.finished, key=lambda f: f.row)
    return RawRollout(
        tokens=[f.tokens for f in done], logprobs=[f.logprobs for f in done], logs=[f.log for f in done],
        prompt_lengths=[len(p) for p in prompts], cache_bytes=run.cache.nbytes(), seconds=elapsed,
        steps=step + 1, slots=run.table.size, prefills=run.prefills,
        attention_stats=run.stats if options.calibration else None,
    )
