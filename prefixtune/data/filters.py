"""Row filters by field: ``--train-where`` / ``--eval-where``.

The extrapolation experiments of Li & Liang 2021 (section 6.4, WebNLG's "unseen"
categories) train on some values of a field and score on the others. A filter is one
condition on one field of the raw record (a JSON key, a CSV/TSV column):

- ``FIELD=V1,V2,...`` keeps the rows whose FIELD is one of the values;
- ``FIELD!=V1,V2,...`` keeps the rows whose FIELD is none of them.

Values are compared as text (a JSON number ``1`` matches ``1``), exactly, case included;
spaces around the field and the values are ignored, and a value cannot contain a comma.
A row that lacks the field is an error, never a silent miss. This module only parses and
matches; :func:`prefixtune.data.load_examples` applies it while reading.
"""

from __future__ import annotations

from dataclasses import dataclass

SYNTAX = "FIELD=V1,V2,... (keep those values) or FIELD!=V1,V2,... (drop them)"


@dataclass(frozen=True)
class Where:
    """One parsed filter; ``option`` (``--train-where``) and ``text`` name it in messages."""

    option: str
    text: str
    field: str
    values: frozenset[str]
    include: bool
    """``True`` for ``=`` (keep the values), ``False`` for ``!=`` (drop them)."""

    @classmethod
    def parse(cls, text: str, option: str) -> "Where":
        """The filter ``text`` of ``option``; a ``ValueError`` that says what is wrong with it."""
        field, sep, rest = text.partition("!=") if "!=" in text else text.partition("=")
        values = frozenset(v.strip() for v in rest.split(",") if v.strip())
        if not sep or not field.strip() or not values or any(c in field for c in "=!") or "=" in rest:
            raise ValueError(f"expected {SYNTAX}, got {text!r}")
        return cls(option, text, field.strip(), values, include=sep == "=")

    def keeps(self, record: dict, at: str) -> bool:
        """Whether the row ``record`` (read at ``at``, ``file:line``) passes the filter."""
        if self.field not in record:
            raise ValueError(f"{at}: {self.option} {self.text!r} names field {self.field!r}, which this row lacks "
                           f"(fields: {', '.join(map(str, record))})")
        return (str(record[self.field]) in self.values) == self.include


def parsed(text: str | None, option: str) -> Where | None:
    """``Where.parse`` of an option's value, ``None`` for no filter."""
    return None if text is None else Where.parse(text, "--" + option.replace("_", "-"))


def sets(text: str | None, option: str) -> dict[str, Where]:
    """Named filters, ``NAME:FILTER;NAME:FILTER`` (``--eval-sets``): ``{name: Where}`` in their order."""
    out: dict[str, Where] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        name, sep, rule = part.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"expected NAME:FILTER;NAME:FILTER (each FILTER {SYNTAX}), got {part!r}")
        if name.strip() in out:
            raise ValueError(f"names the set {name.strip()!r} twice")
        out[name.strip()] = Where.parse(rule.strip(), "--" + option.replace("_", "-") + f" {name.strip()}")
    if text is not None and not out:
        raise ValueError("names no set")
    return out


def problems(config, *names: str, named: tuple[str, ...] = ()):
    """``(option, message)`` for each of the filter options ``names`` (and the sets of filters ``named``)
    of ``config`` that does not parse (for a config's ``problems()``: refused before anything runs)."""
    for name in (*names, *named):
        try:
            (sets if name in named else parsed)(getattr(config, name), name)
        except ValueError as err:
            yield name, str(err)
