"""Dataclass configs as command-line options and as YAML files.

The command line is generated from the config dataclasses (their field help is the
``--help`` text), and a run's YAML config is a plain dump of the same dataclass, so
``--config run.yaml`` replays a run and ``--key value`` overrides it. A field that is itself
a dataclass (``TrainConfig.prefix_config``, a :class:`~prefixtune.config.PrefixConfig`)
contributes its own fields as options, under their ``option`` names where they have one
(``PrefixConfig.dropout`` is ``--prefix-dropout``): the user sees one flat list of options,
the code one :class:`PrefixConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Option:
    """One user-facing option: its name, where it lives in the config, its type and help."""

    name: str
    path: tuple[str, ...]
    field: dataclasses.Field
    kind: str
    """``bool``, ``int``, ``float``, ``str``, or ``list[int]`` / ``list[str]`` (comma-separated on the command line)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self):
        f = self.field
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def options_of(config_cls) -> list[Option]:
    """Every option of ``config_cls``, nested dataclass fields flattened in place."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += [dataclasses.replace(o, path=(f.name, *o.path)) for o in options_of(hints[f.name])]
        else:
            out.append(Option(f.metadata.get("option", f.name), (f.name,), f, _kind(hints[f.name])))
    return out


def add_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--option-name`` per option; defaults are left to the dataclass."""
    for option in options_of(config_cls):
        help_text = option.field.metadata.get("help", "")
        if "default" not in help_text:
            help_text += f" (default: {_shown(option.default)})"
        if option.kind == "bool":
            parser.add_argument(option.flag, dest=option.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        parser.add_argument(option.flag, dest=option.name, type=_parser_of(option), default=argparse.SUPPRESS,
                            choices=option.field.metadata.get("choices"), metavar=option.name.upper(), help=help_text)


def build(config_cls, args: argparse.Namespace | dict, config_file: str | None = None):
    """The config: dataclass defaults < ``config_file`` (YAML/JSON) < options given on the command line."""
    values = load_file(config_file, config_cls) if config_file else {}
    given = vars(args) if isinstance(args, argparse.Namespace) else args
    names = {o.name for o in options_of(config_cls)}
    values.update({k: v for k, v in given.items() if k in names})
    return from_flat(config_cls, values)


def from_flat(config_cls, values: dict):
    """``config_cls`` from a flat ``{option name: value}`` mapping (nested configs built on the way)."""
    options = {o.name: o for o in options_of(config_cls)}
    unknown = sorted(set(values) - set(options))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}")
    tree: dict = {}
    for name, value in values.items():
        option = options[name]
        node = tree
        for key in option.path[:-1]:
            node = node.setdefault(key, {})
        node[option.path[-1]] = _from_file(option, value)
    return _construct(config_cls, tree)


def _construct(config_cls, tree: dict):
    hints = typing.get_type_hints(config_cls)
    kwargs = {key: _construct(hints[key], value) if dataclasses.is_dataclass(hints[key]) else value
              for key, value in tree.items()}
    return config_cls(**kwargs)


def to_flat(config) -> dict:
    """``{option name: value}`` of every option of ``config`` (lists where the field holds a tuple)."""
    out = {}
    for option in options_of(type(config)):
        value = config
        for key in option.path:
            value = getattr(value, key)
        out[option.name] = list(value) if isinstance(value, tuple) else value
    return out


def load_file(path: str, config_cls) -> dict:
    """Read a YAML (or JSON) config as flat options; unknown keys are an error naming the file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - {o.name for o in options_of(config_cls)})
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return data


def dump(config, path: Path) -> None:
    """Write ``config`` as YAML (every option, so the run can be replayed exactly)."""
    path.write_text(yaml.safe_dump(to_flat(config), sort_keys=False), encoding="utf-8")


def split_list(text: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty parts dropped)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _parser_of(option: Option):
    """The ``type=`` of an option: lists are comma-separated; ``unescape`` turns a typed ``\\n`` into a line break."""
    if option.field.metadata.get("unescape"):
        return _unescape
    if option.kind.startswith("list"):
        item = int if option.kind == "list[int]" else str
        return lambda text: tuple(item(part) for part in split_list(text))
    return {"int": int, "float": float}.get(option.kind, str)


def _from_file(option: Option, value):
    """A list option's value from YAML: a list, or a comma-separated string as typed on the command line."""
    if option.kind.startswith("list") and isinstance(value, str):
        return _parser_of(option)(value)
    return tuple(value) if option.kind.startswith("list") and isinstance(value, list) else value


def _unescape(text: str) -> str:
    """``\\n`` and ``\\t`` as typed in a shell (where quotes keep them literal) become the characters."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _kind(annotation) -> str:
    """The kind of a field's type, ``None`` aside: ``int | None`` is ``int``, ``tuple[int, ...]`` ``list[int]``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return f"list[{typing.get_args(annotation)[0].__name__}]"
    return getattr(annotation, "__name__", "str")


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
