"""The `thoughtfold` command, one module per subcommand: `generate` (bounded-cache generation),
`grpo` / `train` and `sft` (training), `eval` (accuracy under cache budgets), `report` (tables and
plots of runs) and `bench` (memory and speed tables). Each declares its NAME and HELP, `add_arguments`
and `run`, and its docstring is its --help description; the flags several share are in flags.py.

Every `ThoughtfoldError` (and every bad command-line value, and a write the disk refuses) ends the
command with one line `error: <message>` on stderr and exit status 2, never a traceback. Building the
parser imports neither torch nor transformers: a command loads them when it runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .. import __version__
from ..errors import STORAGE_ERRNOS, ThoughtfoldError
from . import bench, evaluate, generate, report, train

EXIT_USAGE = 2


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <message>` (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The `thoughtfold` argument parser with all subcommands."""
    parser = _Parser(prog="thoughtfold", description="Reasoning LMs under a fixed-size KV cache "
                     "with Progressive Thought Encoding.")
    parser.add_argument("--version", action="version", version=f"thoughtfold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (generate, evaluate, report, bench):
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.__doc__)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    for name, aliases, text in train.TRAINERS:  # TRL's `trl grpo` / `trl sft`: one set of arguments
        p = sub.add_parser(name, aliases=aliases, help=text, description=text)
        train.add_arguments(p)
        p.set_defaults(func=train.run, trainer=name)
    return parser


def _with_trl_flags(argv: list[str]) -> list[str]:
    """A training command's TRL-style `--key value` flags as KEY=VALUE overrides (train.py)."""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None or argv[command] not in train.COMMANDS:
        return argv
    return argv[: command + 1] + train.flags_as_overrides(argv[command + 1 :])


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    log = logging.getLogger("thoughtfold")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("thoughtfold: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(_with_trl_flags(list(sys.argv[1:] if argv is None else argv)))
        return int(args.func(args) or 0)
    except (_UsageError, ThoughtfoldError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a disk that filled up or turned read-only under a write
        if e.errno not in STORAGE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror}; free space there or choose another output "
              "directory", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `thoughtfold generate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
