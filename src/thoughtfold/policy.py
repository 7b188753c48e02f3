"""`Policy`: the public face of the engine -- a HF causal LM plus the bounded cache, the adapters
and the thought encoder, with `generate` (constant-memory rollouts) and the replay."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from .config import AdapterConfig, CacheConfig, SamplingConfig
from .engine.adapter import LowRankLinear, attach_adapters, check_adapter_size, detach_adapters, wide_dtype
from .engine.attention import switch_attention, use_grouped_decode
from .engine.encoder import ThoughtEncoder
from .engine.eviction import (
    EvictionEvent,
    EvictionPolicy,
    ScoredEviction,
    events_within,
    eviction_policy_for,
    head_weights_from_peaks,
)
from .engine.fold import StateFolder
from .engine.replay import DistributionFn, LossFn, replay
from .engine.rollout import RawRollout, RolloutOptions, Streamer, right_pad, rollout
from .errors import ConfigError
from .messages import is_conversation
from .models import check_rope, head_dim, load_model, max_positions
from .persist import adapter_settings, load_adapter_weights, save_adapter
from .prompts import check_prompt_ids, encode_prompt

Prompt = str | Sequence[int] | Sequence[dict]  # text, token ids, or messages (TRL's conversational form)


@dataclass
class GenerationResult:
    """Per-sequence outputs (lists indexed like the prompts) and batch-level `stats`."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    eviction_log: list[list[EvictionEvent]]
    evictions: list[int]
    peak_cache_tokens: list[int]
    truncated: list[bool]
    prompt_ids: list[list[int]]
    stats: dict = field(default_factory=dict)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str) or is_conversation(prompts):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


class Policy:
    """A causal LM decoding under a bounded KV cache, optionally with a LoRA or PTE adapter. It
    changes the model in place (adapter wrappers, grouped decode attention, frozen weights) until
    `unwrap()` takes all of that out again."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cache: CacheConfig | None = None,
        adapter: AdapterConfig | None = None,
        eviction_policy: EvictionPolicy | ScoredEviction | None = None,
        base_model: str | None = None,
        cuda_graph: bool | None = None,
        compile_decode: bool = False,
    ):
        """`cuda_graph`: capture the decode step as a CUDA graph (default: on when the model is on
        a CUDA device; False for eager decoding, e.g. to profile it). `compile_decode`: run the
        decode step through torch.compile (fused kernels; pays a compilation on first use, and
        again for each new batch size or power-of-two prompt width: prompts are left-padded to
        one). `eviction_policy`: a custom policy in place of the one `cache.eviction` names."""
        self.model = model
        self.base_model = base_model or getattr(model, "name_or_path", "") or "unknown"
        check_rope(self.base_model, model.config.to_dict())
        self.tokenizer = tokenizer
        self.cache_config = cache or CacheConfig()
        self.adapter_config = adapter or AdapterConfig()
        if not isinstance(self.adapter_config, AdapterConfig):
            raise ConfigError(f"adapter must be an AdapterConfig, got {type(adapter).__name__}")
        self.eviction_policy = eviction_policy
        self.head_weights: torch.Tensor | None = None  # headkv's, from `calibrate_heads`
        # what wrapping changes, recorded so that unwrap() can put it back
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        self._attention = use_grouped_decode(model)
        self._unwrapped = False
        cfg, pte = model.config, self.adapter_config.mode == "pte"
        kv_dim = cfg.num_key_value_heads * head_dim(cfg)
        encoder_size = ThoughtEncoder.parameter_count(cfg.num_hidden_layers, kv_dim, self.adapter_config)
        check_adapter_size(model, self.adapter_config, encoder_size if pte else 0)
        self.wrappers: list[LowRankLinear] = attach_adapters(model, self.adapter_config)
        self.encoder: ThoughtEncoder | None = None
        if pte:
            dtype = wide_dtype(next(model.parameters()).dtype)
            encoder = ThoughtEncoder(cfg.num_hidden_layers, kv_dim, self.adapter_config)
            self.encoder = encoder.to(self.device, dtype)
        self.folder = StateFolder(model, self.wrappers, self.encoder)
        self.cuda_graph = self.device.type == "cuda"
        self.compile_decode = False
        self.lockstep: Callable[[bool], bool] | None = None
        self.configure_decoding(cuda_graph=cuda_graph, compile_decode=compile_decode)

    def configure_decoding(self, *, cuda_graph: bool | None = None, compile_decode: bool | None = None,
                           lockstep: Callable[[bool], bool] | None = None) -> None:
        """How `generate` decodes from now on; an argument left None keeps its setting. `cuda_graph`:
        capture the decode step as a CUDA graph (CUDA only); `compile_decode`: run it through
        torch.compile; `lockstep(done_here) -> done_everywhere`: for processes whose forward passes
        are collectives (FSDP), so that all of them stop decoding at the same step."""
        if cuda_graph and self.device.type != "cuda":
            raise ConfigError(f"cuda_graph=True needs the model on a CUDA device, but it is on {self.device}")
        if cuda_graph is not None:
            self.cuda_graph = cuda_graph
        if compile_decode is not None:
            self.compile_decode = compile_decode
        if lockstep is not None:
            self.lockstep = lockstep

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        cache: CacheConfig | None = None,
        adapter: AdapterConfig | None = None,
        adapter_path: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        eviction_policy: EvictionPolicy | ScoredEviction | None = None,
        cuda_graph: bool | None = None,
        compile_decode: bool = False,
    ) -> Policy:
        """Load `model` (hub id, local directory or 'default') and wrap it. With `adapter_path`, the
        saved adapter is restored, with its saved cache settings unless `cache` is given; `model`
        then defaults to the base model the adapter was saved from."""
        if adapter_path is not None:
            saved_adapter, cache, model = adapter_settings(adapter_path, model, cache)
            if adapter is not None and adapter != saved_adapter:
                raise ConfigError(f"adapter settings conflict with the adapter saved in {adapter_path}; "
                                  "pass one")
            adapter = saved_adapter
        model = model or "default"
        hf_model, tokenizer = load_model(model, dtype=dtype, device=device)
        policy = cls(hf_model, tokenizer, cache=cache, adapter=adapter, eviction_policy=eviction_policy,
                     base_model=model, cuda_graph=cuda_graph, compile_decode=compile_decode)
        if adapter_path is not None:
            policy.head_weights = load_adapter_weights(adapter_path, policy.model, policy.wrappers,
                                                       policy.encoder)
        return policy

    def unwrap(self) -> nn.Module:
        """The plain transformers model with thoughtfold taken out, as a kvpress press removes its
        hooks: the adapters' wrappers replaced by their base linears, the attention implementation
        and every parameter's requires_grad as they were before this Policy. The model then computes
        exactly what it did before; the Policy cannot generate or replay any more."""
        if not self._unwrapped:
            detach_adapters(self.model, self.wrappers)
            switch_attention(self.model, self._attention)
            for p, requires_grad in self._requires_grad:
                p.requires_grad_(requires_grad)
            self._unwrapped = True
        return self.model

    def _check_wrapped(self) -> None:
        if self._unwrapped:
            raise ConfigError("this Policy was unwrapped (Policy.unwrap() gave its model back): wrap the "
                              "model in a new Policy to use it again")

    def save_adapter(self, directory: str) -> None:
        """Write the adapter (safetensors + JSON settings; in lora mode also a PEFT directory)."""
        self._check_wrapped()
        save_adapter(directory, self.model, self.wrappers, self.encoder, self.adapter_config,
                     self.cache_config, self.base_model, self.head_weights)

    @property
    def cache_config(self) -> CacheConfig:
        """The cache `generate` and the replay run under (`using_cache` swaps it for a block)."""
        return self._cache_config

    @cache_config.setter
    def cache_config(self, cache: CacheConfig) -> None:
        """Checked against the model: the window's slots are allocated up front, and a window longer
        than the model's positions never fills."""
        limit = max_positions(self.model)
        if not isinstance(cache, CacheConfig):
            raise ConfigError(f"cache must be a CacheConfig, got {type(cache).__name__}")
        if cache.window is not None and limit is not None and cache.window > limit:
            raise ConfigError(f"window {cache.window} is larger than the model's {limit} positions, so it "
                              f"never fills: use a window of at most {limit}, or none for a full cache")
        self._cache_config = cache

    @contextmanager
    def using_cache(self, cache: CacheConfig) -> Iterator[Policy]:
        """Decode and replay under `cache` inside the block, then restore the policy's own."""
        previous, self.cache_config = self.cache_config, cache
        try:
            yield self
        finally:
            self.cache_config = previous

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The adapter's A/B matrices and the encoder's parameters (empty in mode 'none')."""
        params = [p for w in self.wrappers for p in (w.lora_down, w.lora_up)]
        if self.encoder is not None:
            params += list(self.encoder.parameters())
        return params

    def parameter_groups(self) -> dict[str, list[torch.Tensor]]:
        """The trainable tensors by role, for per-group learning rates and diagnostics: the adapters'
        down-projections B (PEFT's lora_A), their up-projections A (PEFT's lora_B, zero at init) and
        the thought encoder (queries, projections, global tokens); roles without tensors left out."""
        groups = {"adapter_down": [w.lora_down for w in self.wrappers],
                  "adapter_up": [w.lora_up for w in self.wrappers],
                  "encoder": [] if self.encoder is None else list(self.encoder.parameters())}
        return {name: params for name, params in groups.items() if params}

    def encode(self, prompts: Prompt | Sequence[Prompt], chat_template: bool = True,
               system_prompt: str | None = None) -> list[list[int]]:
        """Token ids of each prompt (chat template applied to strings when asked and available)."""
        ids = [encode_prompt(self.tokenizer, p, chat_template, system_prompt)
               for p in _as_prompt_list(prompts)]
        for i, p in enumerate(ids):
            check_prompt_ids(p, self.model, f"prompt {i}")
        return ids

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat_template: bool = True,
        stop: Sequence[str] | None = None,
        streamer: Streamer | None = None,
        system_prompt: str | None = None,
        slots: int | None = None,
    ) -> GenerationResult:
        """Sample completions under the bounded cache. Returns token ids, log-probs (of the sampled
        token under softmax(logits / temperature), no top-p/top-k truncation), texts and the
        eviction log of each prompt, indexed like the prompts.

        `slots`: how many sequences decode at once (None: every prompt at once). With fewer slots than
        prompts, the others wait in a queue and a finished sequence's slot takes the next one
        (continuous batching); each sequence's tokens, log-probs and eviction log are the same
        whatever the number of slots (with `seed`, each sequence samples from its own stream)."""
        self._check_wrapped()
        sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed)
        options = RolloutOptions(self.eos_token_ids, self.pad_token_id, slots, streamer=streamer,
                                 lockstep=self.lockstep, cuda_graph=self.cuda_graph,
                                 compile_step=self.compile_decode)
        prompt_ids = self.encode(prompts, chat_template, system_prompt)
        check_prompt_ids(max(prompt_ids, key=len), self.model, "a prompt", max_new_tokens)
        stop = [s for s in (stop or []) if s]
        if stop:
            options.stop_check = lambda tails: [any(s in self._decode(t) for s in stop) for t in tails]
        options.eviction_policy = self._eviction_policy(prompt_ids, max_new_tokens)
        raw = rollout(self.model, self.folder, prompt_ids, self.cache_config, sampling, options)
        return self._finish(raw, prompt_ids, stop)

    def _eviction_policy(self, prompt_ids: list[list[int]],
                         max_new_tokens: int) -> EvictionPolicy | ScoredEviction:
        """The custom policy, else the one the cache config names (headkv: calibrated on these
        prompts the first time)."""
        if self.eviction_policy is not None:
            return self.eviction_policy
        if self.cache_config.eviction == "headkv" and self.head_weights is None:
            self.calibrate_heads(prompt_ids, max_new_tokens)
        return eviction_policy_for(self.cache_config, self.head_weights)

    @torch.no_grad()
    def eviction_logs(self, prompt_ids: Sequence[Sequence[int]],
                      completion_ids: Sequence[Sequence[int]]) -> list[list[EvictionEvent]] | None:
        """The eviction log each completion gets when this policy decodes it under its cache: None
        for the default oldest-block schedule (the replay's default), else a teacher-forced pass of
        the completions through the decode path (a scored policy chooses from the attention these
        very tokens receive). What a replay of given targets (SFT, fidelity) needs."""
        cache = self.cache_config
        if not cache.bounded or (self.eviction_policy is None and cache.eviction == "oldest"):
            return None
        prompts = [list(p) for p in prompt_ids]
        width = max(map(len, completion_ids))
        forced = right_pad(completion_ids, width, self.pad_token_id)
        options = RolloutOptions(pad_id=self.pad_token_id, forced=forced,
                                 eviction_policy=self._eviction_policy(prompts, width))
        raw = rollout(self.model, self.folder, prompts, cache, SamplingConfig(width, temperature=1.0),
                      options)
        return [events_within(log, len(c)) for log, c in zip(raw.logs, completion_ids, strict=True)]

    def calibrate_heads(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64) -> torch.Tensor:
        """Per-head weights for `eviction="headkv"` [layers, kv_heads]: decode `prompts` greedily under
        a full cache and measure how sharply each KV head attends to single past thought tokens (the
        summed largest attention weight per query), normalised to mean 1 per layer. Sets
        `self.head_weights` (a headkv policy calibrates on its first prompts unless this was called)."""
        greedy = SamplingConfig(max_new_tokens, temperature=0.0)
        raw = rollout(self.model, self.folder, self.encode(prompts), CacheConfig(), greedy,
                      RolloutOptions(pad_id=self.pad_token_id, calibration=True))
        self.head_weights = head_weights_from_peaks(raw.attention_stats.peak)
        return self.head_weights

    def replay_logprobs(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        eviction_log: Sequence[Sequence[EvictionEvent]] | None = None,
        loss_fn: LossFn | None = None,
        temperature: float = 1.0,
        backprop: str = "state",
        min_length: int = 0,
        distribution_fn: DistributionFn | None = None,
        loss_input: str = "tokens",
    ) -> list[torch.Tensor]:
        """Teacher-forced log-probs of `completion_ids` under this policy's cache, segment by
        segment. `eviction_log=None` uses the default oldest-block schedule. With `loss_fn(logprobs
        [b, m], start, end, rows)` (see replay.LossFn: `rows` index the sequences of `logprobs`, a
        subset when their eviction logs differ), backward runs after each segment (memory bounded
        by the window).
        `backprop`: "state" (default: exact gradient through the chain of encoder states, what
        recall across evictions needs), "truncated" (earlier states detached: cannot learn recall
        across evictions) or "full" (one graph; memory grows with length). `min_length` pads the batch
        to at least that many tokens (same segments on every process). `distribution_fn(logprobs
        [b, m, vocab], start, end, rows)` receives the full next-token log-distributions of each
        segment (see replay.DistributionFn). `loss_input="distribution"` hands `loss_fn` those full
        log-distributions [b, m, vocab], with autograd, instead of the tokens' log-probs (distillation)."""
        self._check_wrapped()
        return replay(
            self.model, self.folder, prompt_ids, completion_ids, self.cache_config, eviction_log,
            loss_fn=loss_fn, temperature=temperature, backprop=backprop, pad_id=self.pad_token_id,
            min_length=min_length, distribution_fn=distribution_fn, loss_input=loss_input,
        )

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends a sequence: from the generation config, the model config and the tokenizer."""
        ids = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        return ids

    @property
    def pad_token_id(self) -> int:
        """The id that pads prompts and replays: the tokenizer's, else the model's, else an EOS id."""
        for source in (self.tokenizer, self.model.generation_config, self.model.config):
            pad = getattr(source, "pad_token_id", None)
            if pad is not None:
                return pad
        return min(self.eos_token_ids, default=0)

    def _decode(self, ids: list[int]) -> str:
        """Text of token ids ('' for a tokenizer-less policy fed token ids, as in benchmarks)."""
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def _cut_at_stop(self, ids: list[int], stop: list[str]) -> int | None:
        """Length of the shortest prefix whose text contains a stop string (binary search: once a
        prefix contains one, every longer prefix does)."""

        def hit(n: int) -> bool:
            return any(s in self._decode(ids[:n]) for s in stop)

        if not stop or not hit(len(ids)):
            return None
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
        return lo

    def _finish(self, raw: RawRollout, prompt_ids: list[list[int]], stop: list[str]) -> GenerationResult:
        eos = self.eos_token_ids
        window = self.cache_config.window
        result = GenerationResult([], [], [], [], [], [], [], prompt_ids)
        rows = zip(raw.tokens, raw.logprobs, raw.logs, raw.prompt_lengths, strict=True)
        for tokens, lps, events, plen in rows:
            row = tokens.tolist()
            eos_at = next((i for i, t in enumerate(row) if t in eos), None)
            n, finished = (len(row), False) if eos_at is None else (eos_at + 1, True)
            cut = self._cut_at_stop(row[:n], stop)
            if cut is not None:
                n, finished = cut, True
            ids = row[:n]
            log = events_within(events, n)
            held = n - 1 if window is None else min(window, n - 1)
            result.completion_ids.append(ids)
            result.logprobs.append(lps[:n].tolist())
            result.texts.append(self._decode(ids))
            result.eviction_log.append(log)
            result.evictions.append(len(log))
            result.peak_cache_tokens.append(plen + max(held, 0))
            result.truncated.append(not finished)
        generated = sum(len(c) for c in result.completion_ids)
        result.stats = {
            "evictions": max(result.evictions),
            "peak_cache_tokens": max(result.peak_cache_tokens),
            "tokens_per_s": generated / raw.seconds if raw.seconds > 0 else 0.0,
            "generated_tokens": generated,
            "decode_steps": raw.steps,
            "slots": raw.slots,
            "slot_occupancy": generated / (raw.steps * raw.slots),
            "prefills": raw.prefills,
            "cache_bytes": raw.cache_bytes,
            "seconds": raw.seconds,
        }
        return result


def concat_rollouts(parts: list[GenerationResult]) -> GenerationResult:
    """One GenerationResult from several generate calls: rows in order, and run totals over all the
    calls (tokens, seconds, eviction events, the token rate, the peak cache)."""
    if len(parts) == 1:
        return parts[0]
    lists = {f.name: [x for p in parts for x in getattr(p, f.name)] for f in fields(GenerationResult)
             if f.name != "stats"}
    tokens = sum(p.stats["generated_tokens"] for p in parts)
    seconds = sum(p.stats["seconds"] for p in parts)
    stats = {"generated_tokens": tokens, "seconds": seconds,
             "tokens_per_s": tokens / seconds if seconds else 0.0,
             "evictions": sum(p.stats["evictions"] for p in parts),
             "peak_cache_tokens": max(p.stats["peak_cache_tokens"] for p in parts)}
    return GenerationResult(**lists, stats=stats)
