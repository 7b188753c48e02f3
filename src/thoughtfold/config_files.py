"""A `TrainConfig` as files hold it: YAML config files and ``key=value`` overrides read into one
(`load_config`), the run's own config.yaml saved in its output_dir and read back on resume
(`RUN_CONFIG_NAME`, `config_to_yaml`, `load_run_config`). TRL's names (trl_names.py) and the names
earlier versions used (`LEGACY_NAMES`) load too, so TRL configs work and saved run configs resume.
OmegaConf and PyYAML load only when a file is read; nothing here imports torch or transformers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checks import check_utf8
from .config import TrainConfig
from .errors import ConfigError
from .trl_names import split_names, with_trl_settings

RUN_CONFIG_NAME = "config.yaml"  # a run's resolved settings, saved in its output_dir

LEGACY_NAMES = {
    "group_size": "num_generations",
    "max_new_tokens": "max_completion_length",
    "lr": "learning_rate",
    "steps": "max_steps",
    "save_every": "save_steps",
    "lr_scheduler": "lr_scheduler_type",
    "epsilon_low": "epsilon",
}
"""Names earlier versions gave TrainConfig fields (old -> current): configs written by them, such as
a run's saved config.yaml that a resume reloads, still load."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                config_class: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """A TrainConfig (or `config_class`, e.g. SFTConfig) from defaults < YAML file < ``key=value``
    overrides (dotted keys, e.g. ``cache.window=256 adapter.mode=lora``); the legacy names in
    LEGACY_NAMES (`lr`, `steps`, ...) and TRL's names (trl_names.py) work too. With ``resume`` set,
    the run's saved config.yaml in its output_dir takes the place of the defaults: a resumed run
    keeps its settings, and the trainer refuses file or override settings that conflict with them.
    Unknown keys and bad types raise ConfigError."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        sources = [] if path is None else [(_yaml_layer(Path(path), "config file"), f"config file {path}")]
        for override in overrides:
            check_utf8(override, f"override {override.partition('=')[0]!a}")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not KEY=VALUE (e.g. cache.window=64)")
        sources.append((OmegaConf.from_dotlist(list(overrides)), "override"))
        layers, explicit, trl = [], [], {}
        for layer, source in sources:
            ours, named = _with_current_names(layer, source, config_class)
            layers.append(OmegaConf.create(ours))
            explicit += list(ours)
            trl.update(named)
        config = _merged(config_class, layers)
        saved = Path(config.output_dir) / RUN_CONFIG_NAME
        if config.resume and saved.is_file():
            config = _merged(config_class, [_run_layer(saved), *layers])
        return with_trl_settings(config, trl, explicit) if trl else config
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        message = str(e).splitlines()[0]
        raise ConfigError(f"config{f' key {key!r}' if key else ''}: {message}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None


def load_run_config(path: str | Path) -> TrainConfig:
    """The settings a run saved in its output_dir (config.yaml), as it ran them."""
    return _merged(TrainConfig, [_run_layer(Path(path))])


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config, as saved next to the run (reload it with `load_config`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _merged(config_class: type[TrainConfig], layers: list) -> TrainConfig:
    """`config_class`'s defaults under the OmegaConf `layers`, later ones winning."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_class), *layers))


def _run_layer(path: Path):
    """A run's saved settings as a layer; runs saved before `adapter.residual` existed ran the paper's
    update B S A, so a missing one is False there (a new config takes the current default)."""
    from omegaconf import OmegaConf

    what = f"the run's saved config {path}"
    ours, trl = _with_current_names(_yaml_layer(path, "the run's saved config"), what, TrainConfig)
    if trl:
        raise ConfigError(f"{what} holds TRL-named settings ({', '.join(trl)}), which a saved run config "
                          "never does: restore the file or start over with overwrite_output_dir=true")
    adapter = ours.setdefault("adapter", {})
    if isinstance(adapter, dict):
        adapter.setdefault("residual", False)
    return OmegaConf.create(ours)


def _yaml_layer(path: Path, what: str):
    """The settings of a YAML file as an OmegaConf layer (as written): UTF-8 text whose top level is
    a mapping, else a one-line ConfigError."""
    import yaml
    from omegaconf import OmegaConf

    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#x} at offset "
                          f"{e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    top = yaml.safe_load(text)
    if not isinstance(top, dict) and top is not None:
        kind = {"list": "list", "bool": "boolean", "str": "string"}.get(type(top).__name__, "number")
        raise ConfigError(f"{what} {path} must be a mapping of settings (key: value), not a {kind}")
    return OmegaConf.create(text)


def _with_current_names(layer, source: str, cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """`layer` (an OmegaConf DictConfig) as (our settings, TRL-named ones), legacy names renamed to
    the current ones and a `report_to` string made a list; an unknown top-level key is a ConfigError
    that suggests the closest known name."""
    from omegaconf import OmegaConf

    out, spelled = {}, {}
    for key, value in OmegaConf.to_container(layer).items():
        name = LEGACY_NAMES.get(str(key), str(key))
        if name in out:
            raise ConfigError(f"{source}: {spelled[name]!r} and {key!r} set the same thing; keep one")
        out[name], spelled[name] = value, key
    if isinstance(out.get("report_to"), str):
        out["report_to"] = [out["report_to"]]
    return split_names(cls, out, f"{source}: ")
