"""The benchmark sets of the Prefix-Tuning paper in the layout that ``configs/*.yaml`` and the studies read.

Li & Liang 2021 evaluate on E2E NLG and WebNLG 2017 (table-to-text); P-Tuning v2 (Liu et al. 2022)
on GLUE's SST-2 among others. Under the data root (:mod:`.location`) each gets one folder:

- ``e2e/trainset.csv``, ``e2e/devset.csv``: the release's CSV, columns ``mr,ref``, one row per reference;
- ``webnlg/train.jsonl``, ``webnlg/dev.jsonl``: ``{"category", "prompt", "completion"}`` per reference,
  the prompt being the entry's modified triples ``subject | property | object`` joined by `` ; ``,
  underscores as spaces;
- ``sst2/train_full.tsv``, ``sst2/dev.tsv``: GLUE's TSV, columns ``sentence<TAB>label``, no quoting.

Rows come from the official release files (``source``, a folder) or else from the Hugging Face Hub's
``datasets`` copy, in the release's order; one writer per format makes the bytes, so both ways give
the same files (E2E's and SST-2's are byte for byte the release's own). Test splits are not made: the
E2E and WebNLG test sets are the challenges' held-out evaluation data. docs/data.md has the licenses.
"""

from __future__ import annotations

import csv
import io
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import hub
from ..messages import not_utf8
from .example import DataError
from .readers import require


@dataclass(frozen=True)
class DataSet:
    """One benchmark set: where it comes from and the files it becomes.

    ``splits`` maps each file it makes to the Hub split it comes from; ``from_release`` reads the
    official files of a folder and ``from_hub`` turns the Hub's records of a split into rows, both
    as ``{file name: rows}``; ``write`` makes a file's text from its rows.
    """

    hub_id: str
    hub_config: str | None
    release: str
    splits: dict[str, str]
    from_release: Callable[[Path], dict[str, list]]
    from_hub: Callable[[Iterable[dict]], list]
    write: Callable[[list], str]


# ---------------------------------------------------------------------------- writers
def _csv_text(rows: list[tuple[str, str]]) -> str:
    """E2E's CSV: header ``mr,ref``, fields quoted only where needed, ``\\r\\n`` line ends (as released)."""
    out = io.StringIO(newline="")
    csv.writer(out).writerows([("mr", "ref"), *rows])
    return out.getvalue()


def _tsv_text(rows: list[tuple[str, str]]) -> str:
    """GLUE's TSV: header ``sentence<TAB>label``, no quoting, ``\\n`` line ends."""
    return "".join(f"{sentence}\t{label}\n" for sentence, label in [("sentence", "label"), *rows])


def _jsonl_text(rows: list[dict]) -> str:
    """One JSON object per line, text as UTF-8 (not ``\\u`` escapes)."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ---------------------------------------------------------------------------- E2E
def _e2e_release(folder: Path) -> dict[str, list]:
    """``trainset.csv`` and ``devset.csv`` of the e2e-dataset release, checked row by row."""
    return {name: _e2e_csv(_release_file(folder, name, E2E.release)) for name in E2E.splits}


def _e2e_csv(path: Path) -> list[tuple[str, str]]:
    reader = csv.reader(io.StringIO(_release_text(path), newline=""))
    if next(reader, None) != ["mr", "ref"]:
        raise DataError(f"{path}:1: expected the header mr,ref of the E2E release")
    return [_pair(row, path, reader.line_num) for row in reader]


def _release_text(path: Path) -> str:
    """A release file's text (UTF-8, as each release is), or a DataError naming the file, line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(not_utf8(str(path), err)) from None


def _e2e_hub(records: Iterable[dict]) -> list[tuple[str, str]]:
    return [(r["meaning_representation"], r["human_reference"]) for r in records]


# ---------------------------------------------------------------------------- WebNLG
def _webnlg_release(folder: Path) -> dict[str, list]:
    """The XML of the WebNLG Challenge 2017 (``train/`` and ``dev/``, each ``1triples`` .. ``7triples``)."""
    challenge = folder / "webnlg_challenge_2017" if (folder / "webnlg_challenge_2017").is_dir() else folder
    out = {}
    for name, split in WEBNLG.splits.items():
        files = [xml for size in range(1, 8) for xml in sorted((challenge / split / f"{size}triples").glob("*.xml"))]
        if not files:
            raise FileNotFoundError(f"--from {folder}: no {split}/1triples/*.xml ... {split}/7triples/*.xml "
                                    f"(the webnlg_challenge_2017 folder of {WEBNLG.release})")
        out[name] = _webnlg_rows(entry for xml in files for entry in _webnlg_xml(xml))
    return out


def _webnlg_xml(path: Path) -> Iterable[tuple[str, list[str], list[str]]]:
    """``(category, modified triples, texts)`` per ``<entry>`` of one release file."""
    try:
        entries = ET.parse(path).getroot().iter("entry")
    except ET.ParseError as e:
        raise DataError(f"{path}: not readable as XML: {e}") from None
    for entry in entries:
        triples = [(m.text or "").strip() for m in entry.iter("mtriple")]
        yield entry.get("category", ""), triples, [lex.text or "" for lex in entry.iter("lex")]


def _webnlg_hub(records: Iterable[dict]) -> list[dict]:
    """The Hub's entries: ``modified_triple_sets.mtriple_set[0]`` and ``lex.text`` as in the XML."""
    return _webnlg_rows((r["category"], r["modified_triple_sets"]["mtriple_set"][0], r["lex"]["text"])
                        for r in records)


def _webnlg_rows(entries: Iterable[tuple[str, list[str], list[str]]]) -> list[dict]:
    """One row per reference text; a text that is empty after stripping is no reference and is left out."""
    rows = []
    for category, triples, texts in entries:
        prompt = " ; ".join(triple.replace("_", " ") for triple in triples)
        rows += [{"category": category, "prompt": prompt, "completion": text.strip()} for text in texts if text.strip()]
    return rows


# ---------------------------------------------------------------------------- SST-2
def _sst2_release(folder: Path) -> dict[str, list]:
    """GLUE's ``SST-2/train.tsv`` (made ``train_full.tsv``) and ``SST-2/dev.tsv``."""
    release = {"train_full.tsv": "train.tsv", "dev.tsv": "dev.tsv"}
    return {name: _sst2_tsv(_release_file(folder, release[name], SST2.release)) for name in SST2.splits}


def _sst2_tsv(path: Path) -> list[tuple[str, str]]:
    lines = _release_text(path).split("\n")
    lines = lines[:-1] if lines and lines[-1] == "" else lines
    if not lines or lines[0] != "sentence\tlabel":
        raise DataError(f"{path}:1: expected the header sentence<TAB>label of GLUE's SST-2")
    return [_label(_pair(line.split("\t"), path, number), path, number)
            for number, line in enumerate(lines[1:], start=2)]


def _sst2_hub(records: Iterable[dict]) -> list[tuple[str, str]]:
    rows = [(r["sentence"], str(r["label"])) for r in records]
    for number, (sentence, label) in enumerate(rows, start=1):
        if any(c in sentence for c in "\t\r\n"):
            raise DataError(f"sst2 row {number}: a tab or line break in the sentence would break the TSV")
        _label((sentence, label), "sst2", number)
    return rows


def _label(row: tuple[str, str], where, number: int) -> tuple[str, str]:
    if row[1] not in ("0", "1"):
        raise DataError(f"{where}:{number}: label must be 0 or 1, got {row[1]!r}")
    return row


# ---------------------------------------------------------------------------- what the readers share
def _release_file(folder: Path, name: str, release: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"--from {folder}: no {name} (the release's files: {release})")
    return path


def _pair(row: list[str], path: Path, line: int) -> tuple[str, str]:
    if len(row) != 2:
        raise DataError(f"{path}:{line}: expected 2 fields, found {len(row)}")
    return row[0], row[1]


# ---------------------------------------------------------------------------- the sets
E2E = DataSet(hub_id="tuetschek/e2e_nlg", hub_config=None,
              release="https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip",
              splits={"trainset.csv": "train", "devset.csv": "validation"},
              from_release=_e2e_release, from_hub=_e2e_hub, write=_csv_text)
WEBNLG = DataSet(hub_id="webnlg-challenge/web_nlg", hub_config="webnlg_challenge_2017",
                 release="https://gitlab.com/shimorina/webnlg-dataset",
                 splits={"train.jsonl": "train", "dev.jsonl": "dev"},
                 from_release=_webnlg_release, from_hub=_webnlg_hub, write=_jsonl_text)
SST2 = DataSet(hub_id="nyu-mll/glue", hub_config="sst2", release="https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
               splits={"train_full.tsv": "train", "dev.tsv": "validation"},
               from_release=_sst2_release, from_hub=_sst2_hub, write=_tsv_text)
SETS = {"e2e": E2E, "webnlg": WEBNLG, "sst2": SST2}


# ---------------------------------------------------------------------------- making the files
def rows_of(name: str, source: str | os.PathLike | None = None) -> dict[str, list]:
    """``{file name: rows}`` of set ``name``: from the release files in ``source``, or from the Hub."""
    data_set = SETS[name]
    if source is not None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--from {source}: not a folder (unpack {data_set.release} and give its folder)")
        return data_set.from_release(folder)
    try:
        datasets = require("datasets", "datasets", f"to download {name} from the Hugging Face Hub")
        hub.require("dataset", data_set.hub_id)
    except (ImportError, OSError) as err:  # no package or no network: the release files are the other way
        raise DataError(f"{err}; or give --from FOLDER, the unpacked release ({data_set.release})") from None
    return {file: data_set.from_hub(datasets.load_dataset(data_set.hub_id, data_set.hub_config, split=split))
            for file, split in data_set.splits.items()}


def prepare(name: str, out: str | os.PathLike, source: str | os.PathLike | None = None,
            force: bool = False) -> list[tuple[Path, int, bool]]:
    """Make set ``name`` in ``out/name``: ``(path, rows, written)`` per file (``written`` False: already there).

    Idempotent: a file that already holds exactly what would be written is left alone. A file that
    differs is refused, before anything is written, unless ``force``.
    """
    data_set = SETS[name]
    texts = {file: (data_set.write(rows).encode("utf-8"), len(rows)) for file, rows in rows_of(name, source).items()}
    folder = Path(out).expanduser() / name
    plan = [(folder / file, content, count) for file, (content, count) in texts.items()]
    changed = [path for path, content, _ in plan if _differs(path, content)]
    clash = [path for path in changed if path.exists()]
    if clash and not force:
        raise FileExistsError(f"{clash[0]}: exists and differs from what prepare makes; --force replaces it")
    folder.mkdir(parents=True, exist_ok=True)
    for path, content, _ in plan:
        if path in changed:
            _write(path, content)
    return [(path, count, path in changed) for path, _, count in plan]


def _differs(path: Path, content: bytes) -> bool:
    if path.exists() and not path.is_file():
        raise FileExistsError(f"{path}: exists and is not a regular file")
    return not path.exists() or path.stat().st_size != len(content) or path.read_bytes() != content


def _write(path: Path, content: bytes) -> None:
    """Write through a temporary file, so that an interrupted run never leaves half a data file."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(content)
    os.replace(part, path)
