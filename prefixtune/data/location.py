"""Where the data sets live: one variable, ``PREFIXTUNE_DATA``, names the data root.

The benchmark sets (E2E, WebNLG, SST-2) are not in the repository: their licenses differ
and each user gets them once, with ``prefixtune data prepare`` (docs/data.md). The root holds
one folder per set (``e2e/``, ``webnlg/``, ``sst2/``). Configs name their files as
``${PREFIXTUNE_DATA}/e2e/trainset.csv``; that one placeholder, and no other ``${...}``, is
replaced when a config file is read, so a config means the same on every machine and a
template or a path that happens to hold ``$`` is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

VARIABLE = "PREFIXTUNE_DATA"
PLACEHOLDER = "${" + VARIABLE + "}"
GUIDE = "docs/data.md"


class NoDataRoot(ValueError):
    """The data root is needed and ``PREFIXTUNE_DATA`` is not set; the message says how to set it."""


def root(folder: str | os.PathLike | None = None, option: str | None = None) -> Path:
    """The data root: ``folder`` when given (a command's ``--data-dir`` or ``--out``), else ``$PREFIXTUNE_DATA``.

    Args:
        folder: The command's own choice of root, if any.
        option: The option that gives ``folder`` (``"--data-dir"``), named in the error.

    Raises:
        NoDataRoot: Neither is given; one line naming the option, the variable and docs/data.md.
    """
    text = os.fspath(folder) if folder else os.environ.get(VARIABLE)
    if not text:
        given = f"{option}: not given, and " if option else ""
        raise NoDataRoot(f"{given}{VARIABLE} is not set: export {VARIABLE}=FOLDER, the folder of the data sets "
                         f"(e2e/, webnlg/, sst2/; {GUIDE} says where each comes from and how to make it)")
    return Path(text).expanduser()


def expand(value):
    """``value`` with ``${PREFIXTUNE_DATA}`` replaced by the data root; anything but a string that holds
    the placeholder is returned as it is."""
    if isinstance(value, str) and PLACEHOLDER in value:
        return value.replace(PLACEHOLDER, str(root()))
    return value
