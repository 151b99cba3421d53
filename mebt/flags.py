"""Command-line flags generated from a command's typed config dataclass: one configuration style for all.

Every `mebt` command is a ``Command``: a config dataclass and a function of it. Its configuration comes,
in this order, from the dataclass defaults, ``--config FILE.yaml`` (a base plus overlays: see
``mebt.config.read_config_file``; a bare name finds a packaged config), dotted ``key=value`` overrides,
then ``--flag value`` options. The flags are generated from the dataclass:

- a top-level field ``num_samples`` becomes ``--num-samples`` (``metadata={"flag": "out"}`` renames it);
  a bool becomes ``--x/--no-x``, a list or tuple takes several values, a ``Literal`` offers its choices;
- a nested dataclass field marked ``metadata={"flags": True}`` lends its fields as top-level flags (and as
  top-level keys of YAML files and overrides); any other nested dataclass is a section, set with
  ``section.key=value`` or in YAML, and listed with its defaults at the end of ``--help``;
- ``Command.positional`` names fields given as plain arguments (``mebt fvd REAL FAKE``).

``--help`` shows every field's default and its one-line doc, taken from the comment on the field's line
in the dataclass (or the comment block above it). Unknown keys fail with "did you mean" (``from_dict``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

import yaml

from mebt.config import apply_overrides, from_dict, read_config_file
from mebt.errors import ConfigError

_FIELD_LINE = re.compile(r"^    (\w+)\s*:[^=]*(?:=.*?)?(?:#\s*(.*))?$")


@dataclass
class Command:
    path: tuple[str, ...]                      # e.g. ("data", "verify") for `mebt data verify`
    config: type | str                         # the config dataclass, or "module:Class" to import on use
    run: Callable[[Any], int | None]           # called with the built config; returns the exit code
    help: str
    description: str = ""
    positional: tuple[str, ...] = ()           # fields given as plain arguments, in this order
    prepare: Callable[[dict], dict] | None = None   # adjusts the merged dict before the dataclass is built


def field_docs(cls: type) -> dict[str, str]:
    """Each field's one-line doc: the comment on its line in the class body, else the comment block above."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):   # classes made at run time have no source
        return {}
    docs, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#") and line.startswith("    ") and not line.startswith("     "):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD_LINE.match(line)
        if match and not line.startswith("     "):
            doc = (match.group(2) or "").strip() or " ".join(above)
            docs.setdefault(match.group(1), doc)
        above = []
    return docs


def _unwrap(tp):
    """(the type inside Optional[...], whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


@dataclass
class _Flag:
    path: tuple[str, ...]
    name: str
    tp: Any
    default: Any
    doc: str


def _fields(cls: type, path: tuple[str, ...] = ()):
    """(flags, sections): flags for top-level and flag-lending fields; (dotted name, cls) of sections."""
    hints, docs = typing.get_type_hints(cls), {}
    for klass in reversed(cls.__mro__):   # docs of inherited fields come from the class that declares them
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    flags, sections = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap(hints[f.name])
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(tp):
            if f.metadata.get("flags"):
                sub_flags, sub_sections = _fields(tp, path + (f.name,))
                flags += sub_flags
                sections += sub_sections
            else:
                sections.append((f.name, tp))
            continue
        name = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        flags.append(_Flag(path + (f.name,), name, hints[f.name], default, docs.get(f.name, "")))
    return flags, sections


def _section_lines(cls: type, prefix: str) -> list[str]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out += _section_lines(tp, f"{prefix}{f.name}.")
            continue
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        doc = docs.get(f.name, "")
        out.append(f"  {prefix}{f.name}={_show(default)}" + (f"  # {doc}" if doc else ""))
    return out


def _show(value) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def add_command(parser: argparse.ArgumentParser, command: Command) -> None:
    """--config, the generated flags and the KEY=VALUE/positional arguments of ``command``."""
    flags, sections = _fields(command.config)
    parser.add_argument("--config", metavar="FILE", help="YAML config (a file, or the name of a packaged config "
                                                          "such as tiny or ucf_16f); flags and KEY=VALUE apply on top")
    parser.add_argument("--print-config", action="store_true", dest="_print_config",
                        help="print the resolved config (every key, its value and doc) as YAML and exit")
    names = {f.path[-1] for f in flags}
    for flag in flags:
        if flag.path[-1] in command.positional:
            continue
        tp, _ = _unwrap(flag.tp)
        kwargs: dict = {"default": argparse.SUPPRESS, "dest": "flag:" + ".".join(flag.path)}
        shown = f" (default: {_show(flag.default)})" if flag.default is not None else ""
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = flag.doc + shown
        else:
            if typing.get_origin(tp) in (list, tuple):
                kwargs["nargs"], kwargs["action"] = "+", "extend"   # --metric a b and --metric a --metric b
            kwargs["help"] = flag.doc + shown
            if typing.get_origin(tp) is Literal:
                kwargs["choices"] = list(typing.get_args(tp))
            else:
                kwargs["metavar"] = flag.path[-1].upper()
        parser.add_argument(flag.name, **kwargs)
    positional = " ".join(p.upper() for p in command.positional)
    parser.add_argument("args", nargs="*", metavar=f"{positional + ' ' if positional else ''}KEY=VALUE",
                        help=(f"{positional}, then " if positional else "") + "dotted config overrides")
    if sections:
        lines = [line for name, cls in sections for line in _section_lines(cls, f"{name}.")]
        parser.epilog = "config keys (set with KEY=VALUE or in --config YAML):\n" + "\n".join(lines)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.set_defaults(_command=command, _flag_names=names)


def _flat_paths(cls: type, path: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Field name -> its path, for the fields that flag-lending sections promote to the top level."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp) and f.metadata.get("flags"):
            for name, sub in _flat_paths(tp, path + (f.name,)).items():
                out.setdefault(name, sub)
            for g in dataclasses.fields(tp):
                out.setdefault(g.name, path + (f.name, g.name))
    return out


def _route(data: dict, cls: type) -> dict:
    """Move top-level keys that belong to a flag-lending section into it (YAML files and overrides)."""
    own = {f.name for f in dataclasses.fields(cls)}
    flat = _flat_paths(cls)
    out: dict = {}
    for key, value in data.items():
        if key not in own and key not in flat:
            known = sorted((own - {p[0] for p in flat.values()}) | set(flat))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            raise ConfigError(f"unknown config key '{key}'{hint}")
        path = (key,) if key in own or key not in flat else flat[key]
        _put(out, path, value, merge=True)
    return out


def _put(data: dict, path: tuple[str, ...], value, merge: bool = False) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    if merge and isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
        node[path[-1]] = {**node[path[-1]], **value}
    else:
        node[path[-1]] = value


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args`` that also takes KEY=VALUE and positional arguments after options (argparse stops
    filling a ``nargs="*"`` positional once an option follows it)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") and a != "--"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # A list flag (nargs "+") takes every word after it: KEY=VALUE overrides it swallowed are overrides.
    swallowed = []
    for dest, value in vars(args).items():
        if dest.startswith("flag:") and isinstance(value, list):
            swallowed += [v for v in value if _is_override(v)]
            setattr(args, dest, [v for v in value if not _is_override(v)])
    if extra or swallowed:
        args.args = [*getattr(args, "args", []), *swallowed, *extra]
    return args


def _is_override(word) -> bool:
    return isinstance(word, str) and "=" in word and re.fullmatch(r"[A-Za-z_][\w.]*", word.split("=", 1)[0]) is not None


def build_config(args: argparse.Namespace):
    """The command's config from --config, KEY=VALUE overrides, flags and positional arguments, in that order."""
    command: Command = args._command
    data = _route(read_config_file(args.config) if args.config else {}, command.config)
    overrides, positional = [], []
    for item in args.args:
        if item == "--":   # `mebt launch slurm eval ... -- --watch ...`: the old separator is harmless
            continue
        key = item.split("=", 1)[0]
        (overrides if "=" in item and re.fullmatch(r"[A-Za-z_][\w.]*", key) else positional).append(item)
    data = _route(apply_overrides(data, overrides), command.config)
    text_flags = {".".join(f.path) for f in _fields(command.config)[0] if _unwrap(f.tp)[0] is str}
    for dest, value in vars(args).items():
        if dest.startswith("flag:"):
            # A text field takes the flag as written: YAML would read `--time 1:30:00` as the number 5400.
            _put(data, tuple(dest[5:].split(".")), value if dest[5:] in text_flags else _parse(value))
    if len(positional) > len(command.positional):
        raise ConfigError(f"unexpected argument '{positional[len(command.positional)]}' (overrides are KEY=VALUE)")
    flat = _flat_paths(command.config)
    for name, value in zip(command.positional, positional):
        _put(data, flat.get(name, (name,)), value)
    if command.prepare:
        data = command.prepare(data)
    try:
        return from_dict(command.config, data)
    except ConfigError as e:
        # Keys of a flag-lending section are top-level keys to the user: name them that way.
        message = str(e)
        for section in {path[0] for path in flat.values()}:
            message = message.replace(f"'{section}.", "'")
        raise ConfigError(message) from None


def _parse(value):
    """Flag values are read like KEY=VALUE overrides: YAML scalars (numbers, null, true), lists item by item."""
    if isinstance(value, list):
        return [_parse(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        return value
    return value if isinstance(parsed, (dict, list)) else parsed


def format_config(cfg, indent: str = "") -> str:
    """``cfg`` as YAML that loads back as a config, each key with its doc as a comment (`--print-config`)."""
    lines, docs = [], {}
    for klass in reversed(type(cfg).__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        doc = f"  # {docs[f.name]}" if docs.get(f.name) else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:{doc}")
            lines.append(format_config(value, indent + "  "))
        else:
            lines.append(f"{indent}{f.name}: {_show(value)}{doc}")
    return "\n".join(lines)
