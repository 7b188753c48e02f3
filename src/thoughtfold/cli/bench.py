"""`thoughtfold bench`: random-init models of a named shape (nothing is downloaded). decode: tokens/s
and peak memory vs generated length (bounded vs full cache vs HF generate); replay: time and peak memory
of replay + backward vs completion length (PTE bounded, per --backprop mode, vs full-cache LoRA); grpo:
one whole GRPO step vs completion length (same rows); encoder: encoder cost per eviction event;
eviction: decode speed and GRPO step time per eviction policy; rollout: continuous vs static batching
at the same slots on long-tailed completion lengths. Prints the tables and writes bench.md,
bench.json and a PNG per length sweep to --output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import AdapterConfig
from ..evaluation.bench.config import BENCHMARKS, BenchConfig
from .flags import comma_list, number

NAME = "bench"
HELP = "decode / replay / grpo / encoder / eviction / rollout benchmarks with tables and plots"
FLAGS = (  # flag, type, default, metavar, help: one per BenchConfig setting
    ("--shape", str, "cpu-small", None, "model shape: cpu-small, tiny (smoke test), smollm2-135m (the "
     "bundled model's, with its real vocabulary) or qwen2.5-3b"),
    ("--lengths", comma_list(int, "lengths", "integers"), None, "N1,N2,...", "generated / completion lengths "
     "[default: 256,1024,4096 decode; 512,2048,8192 replay; 512,1024,2048 grpo; 1024 eviction and "
     "rollout (its token budget)]"),
    ("--window", number(int, "window"), 256, "W", None),
    ("--device", str, "cpu", None, "cpu, cuda, cuda:N"),
    ("--dtype", str, None, None, "float32 / bfloat16 / float16 [default: float32 on CPU, bfloat16 on CUDA]"),
    ("--rank", number(int, "rank"), 32, None, "adapter rank"),
    ("--global-tokens", number(int, "global-tokens"), 32, None, "PTE global tokens"),
    ("--output", str, "runs/bench", "DIR", None),
    ("--baseline-max", number(int, "baseline-max"), None, "N", "decode: run the full-cache and HF baselines "
     "only up to N new tokens [default: every length]"),
    ("--methods", comma_list(str, "methods"), None, "M1,M2,...", "decode: which of bounded, "
     "bounded-compiled, full, hf-static, hf to run [default: all on CUDA; bounded,full,hf on CPU]"),
    ("--tokens", number(int, "tokens"), 1024, None, "encoder: tokens decoded"),
    ("--backprop", comma_list(str, "backprop"), None, "B1,B2,...", "replay, grpo: a PTE row per backprop "
     "mode (state, truncated, full); LoRA's full cache never evicts, so its one row holds for every mode "
     "[default: all three]"),
    ("--replay-batch", number(int, "replay-batch"), None, "N", "grpo: rows per replay micro-batch "
     "(TrainConfig.replay_batch_size), the same for PTE and LoRA [default: the whole group]"),
    ("--evictions", comma_list(str, "evictions"), None, "E1,E2,...", "eviction: the policies compared "
     "(oldest, h2o, snapkv, headkv) [default: all four]"),
    ("--slots", comma_list(int, "slots", "integers"), None, "S1,S2,...", "rollout: slots compared "
     "(continuous vs static batching at each) [default: 8,16]"),
    ("--mixes", comma_list(str, "mixes"), None, "M1,M2,...", "rollout: completion-length mixes (gsm8k, "
     "hard) [default: both]"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"],
                   help="which benchmark [default: %(default)s]")
    p.add_argument("--batch-size", "--batch", dest="batch", type=number(int, "batch-size"), default=4,
                   help="sequences per batch [default: %(default)s]")
    p.add_argument("--compile", action="store_true",
                   help="encoder, rollout: decode through torch.compile (compile_decode=True), as on a GPU")
    for flag, kind, default, metavar, text in FLAGS:
        shown = "" if default is None else " [default: %(default)s]"
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=(text or "").strip() + shown)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.bench.run import run_benchmarks

    optional = {"backprops": args.backprop, "evictions": args.evictions, "slots": args.slots,
                "mixes": args.mixes}
    config = BenchConfig(
        which=args.which, shape=args.shape, lengths=args.lengths, window=args.window, batch=args.batch,
        device=args.device, dtype=args.dtype, output_dir=args.output,
        adapter=AdapterConfig(rank=args.rank, global_tokens=args.global_tokens),
        baseline_max=args.baseline_max, tokens=args.tokens,
        decode_methods=None if args.methods is None else tuple(args.methods),
        compile_decode=args.compile, replay_batch=args.replay_batch,
        **{k: tuple(v) for k, v in optional.items() if v is not None},
    )
    result = run_benchmarks(config)
    out = Path(args.output)
    written = ", ".join(str(p) for p in [out / "bench.md", out / "bench.json", *result.plots])
    print(f"thoughtfold: wrote {written}", file=sys.stderr)
    return 0
