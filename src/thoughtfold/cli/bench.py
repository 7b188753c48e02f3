"""`thoughtfold bench`: the benchmarks of evaluation/bench (decode, replay, grpo, encoder, eviction)
from the command line, one flag per `BenchConfig` setting."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import AdapterConfig
from ..evaluation.bench.config import BENCHMARKS, BenchConfig
from .flags import comma_list, number


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="decode / replay / grpo / encoder / eviction benchmarks with tables and plots",
        description="Random-init models of a named shape (nothing is downloaded). decode: tokens/s and "
        "peak memory vs generated length (bounded vs full cache vs HF generate); replay: time and peak "
        "memory of replay + backward vs completion length (PTE bounded, per --backprop mode, vs full-cache "
        "LoRA); grpo: one whole GRPO step vs completion length (same rows); encoder: encoder cost per "
        "eviction event; eviction: decode speed and GRPO step time per eviction policy. Prints the tables "
        "and writes bench.md, bench.json and a PNG per length sweep to --output.",
    )
    p.add_argument("which", nargs="?", default="all", choices=[*BENCHMARKS, "all"],
                   help="which benchmark [default: %(default)s]")
    p.add_argument("--shape", default="cpu-small", help="model shape: cpu-small, tiny (smoke test) or "
                   "qwen2.5-3b [default: %(default)s]")
    p.add_argument("--lengths", type=comma_list(int, "lengths", "integers"), default=None, metavar="N1,N2,...",
                   help="generated / completion lengths [default: 256,1024,4096 decode; 512,2048,8192 replay; "
                   "512,1024,2048 grpo; 1024 eviction]")
    p.add_argument("--window", type=number(int, "window"), default=256, metavar="W", help="[default: %(default)s]")
    p.add_argument("--batch-size", "--batch", dest="batch", type=number(int, "batch-size"), default=4,
                   help="sequences per batch [default: %(default)s]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N [default: %(default)s]")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 [default: float32 on CPU, "
                   "bfloat16 on CUDA]")
    p.add_argument("--rank", type=number(int, "rank"), default=32, help="adapter rank [default: %(default)s]")
    p.add_argument("--global-tokens", type=number(int, "global-tokens"), default=32,
                   help="PTE global tokens [default: %(default)s]")
    p.add_argument("--output", default="runs/bench", metavar="DIR", help="[default: %(default)s]")
    _add_per_benchmark_flags(p)
    p.set_defaults(func=run)


def _add_per_benchmark_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline-max", type=number(int, "baseline-max"), default=None, metavar="N",
                   help="decode: run the full-cache and HF baselines only up to N new tokens "
                   "[default: every length]")
    p.add_argument("--methods", type=comma_list(str, "methods"), default=None, metavar="M1,M2,...",
                   help="decode: which of bounded, bounded-compiled, full, hf-static, hf to run "
                   "[default: all on CUDA; bounded,full,hf on CPU]")
    p.add_argument("--tokens", type=number(int, "tokens"), default=1024,
                   help="encoder: tokens decoded [default: %(default)s]")
    p.add_argument("--compile", action="store_true",
                   help="encoder: decode through torch.compile (compile_decode=True), as on a GPU run")
    p.add_argument("--backprop", type=comma_list(str, "backprop"), default=None, metavar="B1,B2,...",
                   help="replay, grpo: a PTE row per backprop mode (state, truncated, full); LoRA's full cache "
                   "never evicts, so its one row holds for every mode [default: all three]")
    p.add_argument("--replay-batch", type=number(int, "replay-batch"), default=None, metavar="N",
                   help="grpo: rows per replay micro-batch (TrainConfig.replay_batch_size), the same for PTE "
                   "and LoRA [default: the whole group]")
    p.add_argument("--evictions", type=comma_list(str, "evictions"), default=None, metavar="E1,E2,...",
                   help="eviction: the policies compared (oldest, h2o, snapkv, headkv) [default: all four]")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.bench.run import run_benchmarks

    optional = {"backprops": args.backprop, "evictions": args.evictions}
    config = BenchConfig(
        which=args.which, shape=args.shape, lengths=args.lengths, window=args.window, batch=args.batch,
        device=args.device, dtype=args.dtype, output_dir=args.output,
        adapter=AdapterConfig(rank=args.rank, global_tokens=args.global_tokens), baseline_max=args.baseline_max,
        decode_methods=None if args.methods is None else tuple(args.methods), tokens=args.tokens,
        compile_decode=args.compile, replay_batch=args.replay_batch,
        **{k: tuple(v) for k, v in optional.items() if v is not None},
    )
    result = run_benchmarks(config)
    out = Path(args.output)
    written = ", ".join(str(p) for p in [out / "bench.md", out / "bench.json", *result.plots])
    print(f"thoughtfold: wrote {written}", file=sys.stderr)
    return 0
