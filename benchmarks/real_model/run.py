"""PTE on a pretrained model: experiments on the bundled SmolLM2-135M-Instruct, each one command:

    python benchmarks/real_model/run.py --experiments recall-words [--set key=value ...]
    python benchmarks/real_model/run.py --experiments gsm8k-distill
    python benchmarks/real_model/run.py --experiments gsm8k-eviction \
        --results benchmarks/real_model/eviction/results.json

* recall-words (recall_words.py): recall of a self-chosen word after it left the window.
* gsm8k-distill (gsm8k_distill.py): dense KL self-distillation under the window on GSM8K solutions.
* gsm8k-eviction (gsm8k_eviction.py): fidelity to the full-cache model per eviction policy.

Each experiment's settings are its YAML file next to this script; `--set key=value` overrides any of
them (dotted keys, e.g. `--set window=8 train.max_steps=400 arms.pte.backprop=state`). Every trained
arm runs the shipped SFTTrainer. Results go to `results.json` (the experiment's entry replaced, the
others kept; rows `{"method", "metric", "value", "n"}` plus `lo`/`hi` for 95% intervals), a plot per
experiment (`<name>.png`) and `log.txt`; `--out` holds the data, the trainers' runs and checkpoints.
A run cut short continues where it stopped when started again with the same `--out` and settings.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gsm8k_distill  # noqa: E402
import gsm8k_eviction  # noqa: E402
import recall_words  # noqa: E402
from common import HERE, ROOT, Log, load_settings, write_results  # noqa: E402
from plots import plot_experiment  # noqa: E402

EXPERIMENTS = {m.NAME: m.run for m in (recall_words, gsm8k_distill, gsm8k_eviction)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", default="recall-words,gsm8k-distill",
                    help=f"comma-separated, from {', '.join(EXPERIMENTS)} [default: %(default)s]")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the experiment's YAML (repeatable)")
    ap.add_argument("--arms", default=None, help="comma-separated: run only these arms of the experiment (a "
                    "variant's run); differences and criteria need both of their arms")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real-model")
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    args = ap.parse_args(argv)
    names = [n for n in args.experiments.split(",") if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        ap.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    log = Log(args.results.with_name("log.txt"))
    for name in names:
        settings = load_settings(name, args.overrides)
        if args.arms:
            keep = args.arms.split(",")
            if unknown := [a for a in keep if a not in settings.get("arms", {})]:
                ap.error(f"{name} has no arm(s) {unknown}")
            settings["arms"] = {a: o for a, o in settings["arms"].items() if a in keep}
            settings["differences"] = [d for d in settings.get("differences", []) if set(d) <= set(keep)]
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        log(f"{name}: torch {torch.__version__}, settings {settings}")
        start, cpu = time.perf_counter(), time.process_time()
        experiment = EXPERIMENTS[name](settings, out, log)
        experiment["wall_seconds"] = round(time.perf_counter() - start, 1)
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True)
        experiment["commit"] = commit.stdout.strip() or None
        write_results(args.results, experiment)
        plot_experiment(experiment, args.results.with_name(f"{name}.png"))
        log(f"{name}: done in {experiment['wall_seconds']:.0f}s (main process "
            f"{time.process_time() - cpu:.0f} CPU-s); criteria {experiment.get('criteria', {})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
