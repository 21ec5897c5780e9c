"""``prefixtune data prepare e2e|webnlg|sst2 [--from FOLDER] [--out DIR] [--force]``.

A module command of :mod:`prefixtune.cli`: the benchmark sets in the layout the configs read
(:mod:`.prepare`), under ``--out`` or else ``$PREFIXTUNE_DATA`` (docs/data.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .location import VARIABLE, root

SUMMARY = f"prepare the benchmark data sets (E2E, WebNLG, SST-2) under ${VARIABLE}"
DESCRIPTION = (f"The benchmark data sets under the data root, ${VARIABLE} (docs/data.md): `prefixtune data prepare NAME` "
               "makes one set's files.")
PREPARE = (f"Turn a benchmark set's official release files (--from FOLDER) or, without --from, the Hugging Face Hub's "
           f"copy (needs `pip install datasets` and the network) into the files the configs and studies read, under "
           f"--out (default ${VARIABLE}): e2e/trainset.csv and devset.csv, webnlg/train.jsonl and dev.jsonl, "
           f"sst2/train_full.tsv and dev.tsv. docs/data.md says where each set comes from and its license.")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .prepare import SETS

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="make one set's files under the data root", description=PREPARE)
    prepare.add_argument("name", choices=SETS, help="the set: " + ", ".join(
        f"{name} (Hub: {s.hub_id}{':' + s.hub_config if s.hub_config else ''}; release: {s.release})"
        for name, s in SETS.items()))
    prepare.add_argument("--from", dest="source", default=None, metavar="FOLDER",
                         help="the unpacked official release (e2e-dataset; webnlg-dataset or its webnlg_challenge_2017 "
                         "folder; GLUE's SST-2 folder) instead of the Hub")
    prepare.add_argument("--out", default=None, metavar="DIR", help=f"the data root (default: ${VARIABLE})")
    prepare.add_argument("--force", action="store_true", help="replace files that differ from what prepare makes")


def run(args: argparse.Namespace) -> int:
    from .prepare import prepare

    out = root(args.out, option="--out")
    for path, rows, written in prepare(args.name, out, args.source, force=args.force):
        print(f"{'wrote' if written else 'unchanged'} {path} ({rows:,} rows)")
    given = os.environ.get(VARIABLE)
    if not given or Path(given).expanduser().resolve() != out.resolve():
        print(f"export {VARIABLE}={out.resolve()}   # for configs/*.yaml and the studies")
    return 0
