"""`thoughtfold report`: compare evaluation and training runs: accuracy by cache window per method (from
eval summary.json files) and reward curves (from training metrics.jsonl), as one markdown page (printed
and written as report.md) and PNG plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "report"
HELP = "compare runs: markdown tables and PNG plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="eval output or training run directories")
    p.add_argument("--output", default="runs/report", metavar="DIR", help="where report.md and the plots go "
                   "[default: %(default)s]")


def run(args: argparse.Namespace) -> int:
    from ..evaluation.report import REPORT_NAME, build_report

    text, plots = build_report(args.runs, args.output)
    print(text, end="")
    print(f"thoughtfold: wrote {Path(args.output) / REPORT_NAME} and {len(plots)} plot(s) in {args.output}",
          file=sys.stderr)
    return 0
