"""Where a decode step's time goes: kernel times of compiled decode steps, by kind.

The bench reports a step's share of the bandwidth floor (47% on an H100 on 2026-11-26) but not what
fills the rest. This profiles `--steps` compiled decode steps without the CUDA graph (so that each
kernel is visible; the graph replays the same kernels) and prints the top kernels and a summary by
kind: GEMMs, attention, fused elementwise (Triton), sampling/other. Usage, from the repository root:

    PYTHONPATH=src python benchmarks/gpu/profile_step.py [--mode none|pte] [--shape qwen2.5-3b]

On a CPU it runs the same flow on CPU kernels (a smoke test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import re

import torch
from torch.profiler import ProfilerActivity, profile

from thoughtfold import AdapterConfig, CacheConfig
from thoughtfold.evaluation.bench.config import SHAPES
from thoughtfold.evaluation.bench.measure import random_model
from thoughtfold.policy import Policy

KINDS = (  # first match wins
    ("attention", re.compile(r"attention|fmha|flash|sdpa|efficient", re.I)),
    ("GEMM", re.compile(r"gemm|gemv|matmul|sm90|cutlass|ampere|\bmm\b|addmm|bmm|linear", re.I)),
    ("fused elementwise (triton)", re.compile(r"triton", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-3b", choices=sorted(SHAPES))
    ap.add_argument("--mode", default="none", choices=["none", "lora", "pte"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--no-compile", action="store_true", help="profile the eager step instead")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = random_model(args.shape, device, torch.bfloat16 if cuda else torch.float32)
    policy = Policy(model, None, cache=CacheConfig(window=args.window), adapter=AdapterConfig(mode=args.mode),
                    cuda_graph=False, compile_decode=not args.no_compile)
    prompts = torch.randint(1, SHAPES[args.shape]["vocab_size"], (args.batch, 32),
                            generator=torch.Generator().manual_seed(0)).tolist()
    policy.generate(prompts, max_new_tokens=args.steps, temperature=0)  # compile, warm up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        policy.generate(prompts, max_new_tokens=args.steps, temperature=0)
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted((e for e in events if getattr(e, attr) > 0), key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.shape} mode={args.mode} batch={args.batch} W={args.window} "
          f"{'compiled' if not args.no_compile else 'eager'} on {device}: "
          f"{total / 1e3 / args.steps:.2f} ms of {'kernel' if cuda else 'op'} time per step "
          "(prefill included)")
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + getattr(e, attr)
    print("\n| kind | ms / step | share |\n|---|---|---|")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t / 1e3 / args.steps:.3f} | {t / total:.0%} |")
    print("\n| kernel | calls / step | ms / step | share |\n|---|---|---|---|")
    for e in events[:25]:
        t = getattr(e, attr)
        print(f"| {e.key[:90]} | {e.count / args.steps:.1f} | {t / 1e3 / args.steps:.3f} | {t / total:.1%} |")


if __name__ == "__main__":
    main()
