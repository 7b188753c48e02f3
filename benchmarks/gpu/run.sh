#!/usr/bin/env bash
# The GPU checks on one H100/H200: random-init Qwen2.5-3B shape, bf16 base, W = 1024 (batch 32 unless
# said otherwise).
# Steps; name the ones to run (default: all), each under its own time limit:
#   tests    the CUDA tests: captured decode == eager, compiled == eager, grouped attention == SDPA (~50 s)
#   encoder  rollouts with no adapter vs LoRA vs PTE vs PTE without sibling grouping, same window,
#            compiled + CUDA graph, median of 3 each: PTE's overhead over plain decoding (~350 s, estimated)
#   long     compiled bounded decode at 1K and 32K new tokens: tokens/s and peak memory (~240 s, estimated)
#   decode   1K new tokens: bounded (compiled + CUDA graph, and graph only) vs HF static cache +
#            torch.compile, side by side, with the bounded step's share of the bandwidth floor (~180 s)
#   profile  kernel times of compiled decode steps by kind (GEMM, attention, fused elementwise), for
#            the plain and the PTE step: where the time above the floor goes (~150 s, estimated)
#   train    one whole GRPOTrainer step (rollouts of one group of 8 + a random reward + the replay
#            update, default backprop "state") for PTE under W and for LoRA with a full cache, rank 32,
#            32 global tokens, fp32 adapters, encoder and AdamW state, at 3072 and 6144 completion
#            tokens (forced: the random-init model has no EOS token): step time, CUDA peak memory,
#            PTE/LoRA peak (the paper: ~0.55x at 3K tokens, W = 1K) and PTE's peak at 6144 / at 3072.
#            The replay runs one sequence at a time (--replay-batch 1) for both: the whole group at
#            once would not fit LoRA's full-cache replay on the card (estimated ~6 MB of activations per
#            token over 36 layers plus ~2.7 MB of float32 logits per completion token: over 200 GB at
#            3072). (~5 min, estimated: ~23,000 decode steps of 8 sequences at ~10 ms, plus the replays)
#   rollout  continuous vs static batching at 32 slots, PTE compiled + CUDA graph, on the long-tailed
#            completion-length mixes under a 2048-token budget: useful tokens/s, decode steps, slot
#            occupancy, peak memory, and a check that both decode the same tokens (~6 min, estimated)
# A device session has 15 minutes and 10 per call: run `tests encoder` and then `long` back to back
# (the machine stays warm for 30 s), `train` in a session of its own (or after `tests`); `decode` was
# measured on 2026-11-26 (benchmarks/RESULTS.md).
# Usage, from the repository root:
#   OUT=runs/gpu bash benchmarks/gpu/run.sh [tests] [encoder] [long] [decode] [profile] [train] [rollout]
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STEPS=${*:-tests encoder long decode train}
BENCH="python -m thoughtfold.cli bench --shape qwen2.5-3b --device cuda --window 1024"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

for step in $STEPS; do
  case $step in
    tests) timeout 150 python -m pytest -q -p no:cacheprovider tests/test_graph.py tests/test_attention.py ;;
    decode) timeout 330 $BENCH decode --batch-size 32 --lengths 1024 --methods bounded-compiled,hf-static,bounded \
              --output "$OUT/decode" ;;
    encoder) timeout 420 $BENCH encoder --batch-size 32 --tokens 2048 --compile --output "$OUT/encoder" ;;
    profile) for mode in none pte; do timeout 150 python benchmarks/gpu/profile_step.py --mode $mode; done ;;
    long) timeout 420 $BENCH decode --batch-size 32 --lengths 1024,32768 --methods bounded-compiled --output "$OUT/long" ;;
    train) timeout 570 $BENCH grpo --batch-size 8 --lengths 3072,6144 --rank 32 --global-tokens 32 --backprop state \
             --replay-batch 1 --output "$OUT/train" ;;
    rollout) timeout 420 $BENCH rollout --slots 32 --lengths 2048 --compile --output "$OUT/rollout" ;;
    *) echo "unknown step $step (tests, encoder, long, decode, profile, train, rollout)"; exit 2 ;;
  esac 2>&1 | tee "$OUT/$step.log"
done
