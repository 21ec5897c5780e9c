"""Dataclass configs as command-line options and as YAML files.

The command line is generated from the config dataclasses (their field help is the
``--help`` text), and a run's YAML config is a plain dump of the same dataclass, so
``--config run.yaml`` replays a run and ``--key value`` overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import yaml

_TYPES = {"int": int, "float": float, "str": str}


def add_options(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--field-name`` option per dataclass field; defaults are left to the dataclass."""
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if "default" not in help_text:
            help_text += f" (default: {f.default})"
        kind = _base_type(f.type)
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        convert = _unescape if f.metadata.get("unescape") else _TYPES.get(kind, str)
        parser.add_argument(flag, type=convert, default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), metavar=f.name.upper(), help=help_text)


def build(config_cls, args: argparse.Namespace, config_file: str | None = None):
    """The config: dataclass defaults < ``config_file`` (YAML/JSON) < options given on the command line."""
    values = load_file(config_file, config_cls) if config_file else {}
    names = {f.name for f in dataclasses.fields(config_cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_cls(**values)


def load_file(path: str, config_cls) -> dict:
    """Read a YAML (or JSON) config; unknown keys are an error naming the file."""
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
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return data


def dump(config, path: Path) -> None:
    """Write ``config`` as YAML (every field, so the run can be replayed exactly)."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), encoding="utf-8")


def _unescape(text: str) -> str:
    """``\\n`` and ``\\t`` as typed in a shell (where quotes keep them literal) become the characters."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _base_type(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.split("|") if p.strip() != "None"]
    return parts[0] if parts else "str"
