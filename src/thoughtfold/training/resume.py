"""What a resumed run must keep: the settings it was started with. A resume may change how long a run
goes and how it reports (`RESUMABLE`); any other setting that differs from the run's saved
config.yaml would silently make the rest of the run another run, so it is refused, named, before
the model loads. (The checkpoint itself, and what to do with a damaged one, is checkpoint.py's.)"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..config_files import RUN_CONFIG_NAME, load_run_config
from ..errors import ConfigError

RESUMABLE = frozenset({
    "max_steps", "save_steps", "logging_steps", "save_total_limit", "output_dir", "overwrite_output_dir",
    "resume", "progress", "report_to", "device", "compile_decode", "fsdp", "reward_timeout",
    "eval_steps", "log_completions", "num_completions_to_print",
})
"""Settings a resume may change: none of them changes what a step computes."""


def check_run_settings(config: TrainConfig, output_dir: Path) -> None:
    """A ConfigError naming each setting of `config` (outside RESUMABLE) that differs from the run's
    saved config.yaml in `output_dir`; nothing to compare before a run has saved one."""
    path = output_dir / RUN_CONFIG_NAME
    if not path.is_file():
        return
    try:
        saved = load_run_config(path)
    except ConfigError as e:
        raise ConfigError(f"the run's saved settings {path} cannot be read back ({e}); restore the file or "
                          "start over with overwrite_output_dir=true") from None
    given, kept = _flat(asdict(config)), _flat(asdict(saved))
    conflicts = [f"{k}={given.get(k)!r} (the run has {kept.get(k)!r})" for k in sorted(given | kept)
                 if k.split(".")[0] not in RESUMABLE and _norm(given.get(k)) != _norm(kept.get(k))]
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise ConfigError(f"resume: {'; '.join(conflicts[:3])}{more} conflict with the settings the run in "
                          f"{output_dir} was started with ({path}): drop them to continue that run, or start "
                          "a new one in another output_dir")


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"cache.window": 16, ...}."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _norm(value: Any) -> Any:
    """Lists and tuples alike (YAML has only lists)."""
    return list(value) if isinstance(value, tuple) else value
