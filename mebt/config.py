"""Typed configuration: dataclasses per component, YAML files merged into them, dotted CLI overrides.

Every component owns a dataclass (``MeBTConfig``, ``ObjectiveConfig``, ...). A run config nests them.
``load_config(RunConfig, "configs/x.yaml", ["model.n_layer=4"])`` builds one, and every problem
(unknown key, wrong type, inconsistent values) is a single ``ConfigError`` line that names the key.
Consistency checks live in each dataclass's ``__post_init__`` so configs built in code are checked too.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mebt.errors import ConfigError


def check_at_least(cfg, keys: tuple[str, ...], minimum: int) -> None:
    """ConfigError naming the first of ``keys`` whose value on ``cfg`` is below ``minimum`` (0 or 1)."""
    word = "positive" if minimum else "non-negative"
    for key in keys:
        if getattr(cfg, key) < minimum:
            raise ConfigError(f"config key '{key}' must be {word}, got {getattr(cfg, key)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting YAML lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {_type_name(tp)} fields, got {value!r}")
        if "preset" in value and hasattr(tp, "named"):
            # A named preset (e.g. sampling: {preset: ucf_16f}) under the section's other keys: presets are
            # defined once, in code, and configs only name them.
            value = {**to_dict(tp.named(value["preset"])), **{k: v for k, v in value.items() if k != "preset"}}
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}' has an invalid value {value!r} (expected {_type_name(tp)})")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and len(args) > 1 and args[1] is not Ellipsis and len(items) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} items, got {len(items)}")
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)   # YAML and flags read `--time 10` or `job_name: 7` as numbers; the field wants text
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads '1e-3' (no dot) as a string; accept it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _section_default(cls: type, key: str, value: Any) -> Any:
    """The instance a mapping for field ``key`` of ``cls`` starts from when the field's factory is not just a
    class (a shared dataclass with other defaults, e.g. the tokenizer's ``optim``); else None."""
    factory = next(f.default_factory for f in dataclasses.fields(cls) if f.name == key)
    if not isinstance(value, dict) or factory is dataclasses.MISSING or isinstance(factory, type):
        return None
    default = factory()
    return default if dataclasses.is_dataclass(default) else None


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from a (nested) dict, on top of the instance ``base`` if given; unknown keys
    are rejected by name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        default = _section_default(cls, key, value)
        kwargs[key] = (_coerce(value, hints[key], prefix + key) if default is None
                       else from_dict(type(default), value, f"{prefix}{key}.", default))
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if not prefix or msg.startswith(f"config key '{prefix}") else _prefixed(msg, prefix)) from None


def _prefixed(msg: str, prefix: str) -> str:
    # A dataclass's own check names its field as 'config key 'x''; give it its full dotted path.
    return msg.replace("config key '", f"config key '{prefix}", 1)


def as_base(cfg: Any, base: type) -> Any:
    """The ``base`` dataclass part of ``cfg`` (an instance of a subclass that adds command options)."""
    return base(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(base) if f.init})


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML, JSON and MLflow params."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return plain(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'model': {'n_layer': 4}} -> {'model.n_layer': 4}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(value: Any) -> Any:
    # As a JSON or YAML file gives it back: a saved [2, 4] equals the current (2, 4).
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value: Any) -> str:
    """A value in one line of an error: JSON (newlines escaped), sha256 digests and long values cut short."""
    if isinstance(value, str) and len(value) == 64:
        return f"{value[:12]}..."
    text = json.dumps(_plain(value), default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def settings_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``'key (saved X, now Y)'`` for each key of ``new`` whose value is not the one in the saved ``old``;
    nested mappings give dotted keys. Only the keys of ``new`` count: ``old`` may hold more (counts, notes),
    and a key it lacks was None."""
    diffs = []
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            diffs += settings_differences(before, value, f"{prefix}{key}.")
        elif _plain(before) != _plain(value):
            diffs.append(f"{prefix}{key} (saved {_shown(before)}, now {_shown(value)})")
    return diffs


def refuse_changed_settings(what: str, old: dict, new: dict, fix: str, error: type[Exception] = ConfigError) -> None:
    """The one check of work saved with some settings (an output folder, a checkpoint, a loader state) against
    the current ones: raises ``error("WHAT: a (saved 1, now 2), b.c (saved x, now y); FIX")`` if any differ."""
    diffs = settings_differences(old, new)
    if diffs:
        raise error(f"{what}: {', '.join(diffs)}; {fix}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars/lists."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.n_layer=4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (pass an existing YAML file, e.g. configs/tiny.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def packaged_configs() -> Path:
    """The folder of the configs shipped with mebt (``configs/`` of the source tree, installed as ``mebt.configs``)."""
    try:
        from importlib.resources import files

        return Path(str(files("mebt.configs")))
    except ModuleNotFoundError:   # a source checkout that was not installed
        return Path(__file__).resolve().parents[1] / "configs"


def find_config(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file by path, by path relative to ``relative_to``, or by the name of a packaged config
    (``ucf_16f`` or ``ucf_16f.yaml``)."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.append(relative_to / name)
    stem = Path(name).name
    candidates.append(packaged_configs() / (stem if stem.endswith((".yaml", ".yml")) else f"{stem}.yaml"))
    for path in candidates:
        if path.is_file():
            return path
    known = ", ".join(sorted(p.stem for p in packaged_configs().glob("*.yaml")))
    raise ConfigError(f"config file '{name}' does not exist and is not a packaged config (packaged: {known})")


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` on top of ``base``: mappings merge key by key, everything else (lists too) replaces."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(name: str | Path, _seen: tuple = ()) -> dict:
    """A YAML config with its bases: a top-level ``base: OTHER`` (a path relative to this file or a packaged
    config name, or a list of them, applied in order) is read first and this file's keys go on top."""
    path = find_config(name)
    if path.resolve() in _seen:
        raise ConfigError(f"config '{path}' includes itself through 'base:' ({' -> '.join(map(str, _seen))})")
    data = read_yaml(path)
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = merge(merged, read_config_file(find_config(base, path.parent), _seen + (path.resolve(),)))
    return merge(merged, data)


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Any:
    """YAML config (optional; with its ``base:`` files) + dotted overrides -> validated dataclass instance."""
    data = read_config_file(path) if path else {}
    return from_dict(cls, apply_overrides(data, list(overrides)))
