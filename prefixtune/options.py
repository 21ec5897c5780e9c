"""Dataclass configs as command-line options and YAML files, and the one place their values are checked.

The command line is generated from the config dataclasses (their field help is the
``--help`` text), and a run's YAML config is a plain dump of the same dataclass, so
``--config run.yaml`` replays a run and ``--key value`` overrides it. A field that is itself
a dataclass (``TrainConfig.prefix_config``, a :class:`~prefixtune.config.PrefixConfig`)
contributes its own fields as options, under their ``option`` names where they have one
(``PrefixConfig.dropout`` is ``--prefix-dropout``): the user sees one flat list of options,
the code one :class:`PrefixConfig`.

Every config dataclass checks itself when it is built (:func:`check`, from its
``__post_init__``), whoever builds it: the command line, a YAML file, ``compare``, ``serve`` or
Python code. Each field's type and its range (``ge``/``gt``/``le``/``lt``/``choices`` in the
field's metadata) are checked by pydantic, values that mean the same are converted (``"2"`` to
2, ``"no"`` to False), and the dataclass's ``problems()`` adds the rules between fields. A bad
value is an :class:`OptionError`: one line naming the option, what it must be and what it got,
raised before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from dataclasses import dataclass
from pathlib import Path

import pydantic
import yaml

from .data import location
from .messages import first_line, not_utf8, shown, unicode_problem


class OptionError(ValueError):
    """A bad option value, in one line: ``--max-grad-norm: must be at least 0, got -1``."""

    def __init__(self, option: str, message: str, where: str | None = None):
        self.option, self.message, self.where = option, message, where
        shown = option if where else "--" + option.replace("_", "-")
        super().__init__(f"{where + ': ' if where else ''}{shown}: {message}")


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
        if option.field.metadata.get("repeat"):  # --prefix a=x --prefix b=y: one value per flag
            parser.add_argument(option.flag, dest=option.name, action="append", default=argparse.SUPPRESS,
                                metavar=option.field.metadata.get("metavar"), help=help_text)
            continue
        choices = None if option.kind.startswith("list") else option.field.metadata.get("choices")  # lists: by check()
        parser.add_argument(option.flag, dest=option.name, type=_parser_of(option), default=argparse.SUPPRESS,
                            choices=choices, metavar=option.name.upper(), help=help_text)


def build(config_cls, args: argparse.Namespace | dict, config_file: str | None = None):
    """The config: dataclass defaults < ``config_file`` (YAML/JSON) < options given on the command line.
    A bad value that came from the file is reported with the file's name."""
    from_file = load_file(config_file, config_cls) if config_file else {}
    given = vars(args) if isinstance(args, argparse.Namespace) else args
    names = {o.name for o in options_of(config_cls)}
    given = {k: v for k, v in given.items() if k in names}
    try:
        return from_flat(config_cls, {**from_file, **given})
    except OptionError as err:
        if err.option in from_file and err.option not in given:
            raise OptionError(err.option, err.message, where=config_file) from None
        raise


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
    if file.is_dir():
        raise ValueError(f"--config {path}: is a folder; give the YAML or JSON file (a run's config.yaml)")
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeys) or {}
    except UnicodeDecodeError as err:
        raise ValueError(not_utf8(path, err)) from None
    except yaml.MarkedYAMLError as err:  # one line: the file's line, and what is wrong there
        where = f"{path}:{err.problem_mark.line + 1}" if err.problem_mark else path
        raise ValueError(f"{where}: not valid YAML ({err.problem})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({first_line(err)})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a config of options") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    try:  # configs name data files as ${PREFIXTUNE_DATA}/e2e/trainset.csv (docs/data.md)
        data = {str(k).replace("-", "_"): location.expand(v) for k, v in data.items()}
    except location.NoDataRoot as err:
        raise location.NoDataRoot(f"{path}: {err}") from None
    unknown = sorted(set(data) - {o.name for o in options_of(config_cls)})
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return data


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it would keep the last silently: a
    config edited in two places would run with whichever came last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def dump(config, path: Path, header: str = "") -> None:
    """Write ``config`` as YAML (every option, so the run can be replayed exactly), after ``header`` (comment lines)."""
    path.write_text(header + yaml.safe_dump(to_flat(config), sort_keys=False), encoding="utf-8")


def split_list(text: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (empty parts dropped)."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _parser_of(option: Option):
    """The ``type=`` of an option: lists are comma-separated; ``unescape`` turns a typed ``\\n`` into a line break."""
    if option.field.metadata.get("unescape"):
        return _unescape
    if option.kind.startswith("list"):
        item = int if option.kind == "list[int]" else str

        def listed(text: str) -> tuple:
            return tuple(item(part) for part in split_list(text))
        listed.__name__ = "comma-separated list of " + ("whole numbers" if item is int else "names")
        return listed
    return {"int": int, "float": float}.get(option.kind, str)


def _from_file(option: Option, value):
    """A list option's value from YAML: a list, or a comma-separated string as typed on the command line."""
    if option.kind.startswith("list") and isinstance(value, str):
        return _parser_of(option)(value)
    return tuple(value) if option.kind.startswith("list") and isinstance(value, list) else value


def _unescape(text: str) -> str:
    """``\\n`` and ``\\t`` as typed in a shell (where quotes keep them literal) become the characters."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def check(config) -> None:
    """Check every field of the dataclass ``config`` against its type and range (converting values that
    mean the same, ``"2"`` to 2), then its ``problems()``: ``(option, message)`` pairs of rules between
    fields. Called by each config's ``__post_init__``; raises :class:`OptionError`."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            continue  # a nested config checked itself when it was built
        name = f.metadata.get("option", f.name)
        try:
            setattr(config, f.name, _adapter(type(config), f.name).validate_python(value))
        except pydantic.ValidationError as err:
            raise OptionError(name, _message(err.errors()[0], f.metadata)) from None
        problem = f.metadata.get("check", lambda v: None)(getattr(config, f.name))
        if problem:
            raise OptionError(name, f"{problem}, got {shown(value)}")
    for name, message in getattr(config, "problems", lambda: ())():
        raise OptionError(name, message)


@functools.cache
def _adapter(config_cls, field_name: str) -> pydantic.TypeAdapter:
    """The pydantic check of one field: its type, with the field's range and choices. Numbers are finite
    and never a bool (YAML's ``true`` is not 1); a list named ``unique`` holds each value once."""
    f = next(f for f in dataclasses.fields(config_cls) if f.name == field_name)
    annotation = typing.get_type_hints(config_cls)[field_name]
    args = typing.get_args(annotation)
    optional = type(None) in args
    inner = next(a for a in args if a is not type(None)) if optional else annotation
    if f.metadata.get("choices"):
        allowed = typing.Literal[tuple(f.metadata["choices"])]
        inner = tuple[allowed, ...] if typing.get_origin(inner) is tuple else allowed
    limits = {k: f.metadata[k] for k in ("ge", "gt", "le", "lt", "min_length") if k in f.metadata}
    if inner in (int, float):
        inner = typing.Annotated[inner, pydantic.BeforeValidator(_not_a_bool), pydantic.Field(allow_inf_nan=False)]
    elif typing.get_origin(inner) is tuple and typing.get_args(inner)[0] in (int, float):
        item = typing.Annotated[typing.get_args(inner)[0], pydantic.BeforeValidator(_not_a_bool)]
        inner = tuple[item, ...]
    if limits:
        inner = typing.Annotated[inner, pydantic.Field(**limits)]
    if f.metadata.get("unique"):
        inner = typing.Annotated[inner, pydantic.AfterValidator(_each_once)]
    return pydantic.TypeAdapter(typing.Optional[inner] if optional else inner)


def _not_a_bool(value):
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _each_once(values):
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"names {', '.join(map(str, repeated))} more than once")
    return values


_MESSAGES = {
    "greater_than_equal": "must be at least {ge}", "greater_than": "must be more than {gt}",
    "less_than_equal": "must be at most {le}", "less_than": "must be less than {lt}",
    "int_parsing": "must be a whole number", "int_from_float": "must be a whole number",
    "int_type": "must be a whole number", "float_parsing": "must be a number", "float_type": "must be a number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false", "string_type": "must be text",
    "finite_number": "must be a finite number", "string_too_short": "must not be empty",
    "tuple_type": "must be a list", "too_short": "must name at least one",
}


def _message(error: dict, metadata) -> str:
    """pydantic's first error as a short phrase, with the value it got."""
    kind = error["type"]
    if kind == "literal_error":
        text = "must be one of " + ", ".join(map(str, metadata["choices"]))
    elif kind == "string_unicode":  # pydantic checks a text option's characters where it checks its length
        text = unicode_problem(error["input"])
    elif kind in _MESSAGES:
        text = _MESSAGES[kind].format(**{k: metadata.get(k) for k in ("ge", "gt", "le", "lt")})
    else:
        text = error["msg"].removeprefix("Value error, ")
        text = text[0].lower() + text[1:]
    return f"{text}, got {shown(error['input'])}"


def _kind(annotation) -> str:
    """The kind of a field's type, ``None`` aside: ``int | None`` is ``int``, ``tuple[int, ...]`` ``list[int]``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return f"list[{typing.get_args(annotation)[0].__name__}]"
    return getattr(annotation, "__name__", "str")


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)
