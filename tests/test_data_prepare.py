"""``prefixtune data prepare``: official release files and the Hub's copies become exactly the files the configs
and studies read (compared with the real data under $PREFIXTUNE_DATA), idempotently, with one-line errors."""

import json
import re
import sys

import pytest
from conftest import DATA

from prefixtune.cli import main
from prefixtune.data import prepare


def _release(folder, links: dict):
    """A release folder whose files are links to the real data (never copies of it)."""
    folder.mkdir(parents=True)
    for name, target in links.items():
        (folder / name).symlink_to(target)
    return folder


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------- release files
def test_e2e_release_csvs_are_prepared_byte_for_byte(tmp_path, capsys):
    release = _release(tmp_path / "e2e-dataset", {name: DATA / "e2e" / name for name in ("trainset.csv", "devset.csv")})
    assert main(["data", "prepare", "e2e", "--from", str(release), "--out", str(tmp_path / "root")]) == 0
    for name in ("trainset.csv", "devset.csv"):
        assert (tmp_path / "root" / "e2e" / name).read_bytes() == (DATA / "e2e" / name).read_bytes()
    assert f"wrote {tmp_path / 'root' / 'e2e' / 'trainset.csv'} (42,061 rows)" in capsys.readouterr().out


def test_glue_sst2_train_tsv_becomes_train_full_byte_for_byte(tmp_path):
    release = _release(tmp_path / "SST-2", {"train.tsv": DATA / "sst2" / "train_full.tsv",
                                            "dev.tsv": DATA / "sst2" / "dev.tsv"})
    prepare.prepare("sst2", tmp_path / "root", release)
    for name in ("train_full.tsv", "dev.tsv"):
        assert (tmp_path / "root" / "sst2" / name).read_bytes() == (DATA / "sst2" / name).read_bytes()


ENTRY = """<entry category="{category}" eid="Id{eid}" size="{size}">
<originaltripleset><otriple>ignored | ignored | ignored</otriple></originaltripleset>
<modifiedtripleset>{triples}</modifiedtripleset>
{lexes}
</entry>"""


def _webnlg_xml(path, entries):
    """A release file in the WebNLG Challenge 2017 format: ``<benchmark><entries><entry>...``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "\n".join(ENTRY.format(category=category, eid=i, size=len(triples),
                                  triples="".join(f"<mtriple>{t}</mtriple>" for t in triples),
                                  lexes="\n".join(f'<lex comment="good" lid="Id{j}">{text}</lex>'
                                                  for j, text in enumerate(texts, start=1)))
                     for i, (category, triples, texts) in enumerate(entries, start=1))
    path.write_text(f'<?xml version="1.0" ?>\n<benchmark>\n<entries>\n{body}\n</entries>\n</benchmark>\n',
                    encoding="utf-8")


def _real(name: str, count: int) -> list[dict]:
    return [json.loads(line) for line in (DATA / "webnlg" / name).read_text(encoding="utf-8").splitlines()[:count]]


def test_webnlg_challenge_xml_becomes_the_jsonl_the_configs_read(tmp_path):
    # the first entry of the real train.jsonl, as the release writes it (underscores in names, &quot; escapes)
    train = _real("train.jsonl", 2)
    aarhus = ("Airport", ['Aarhus_Airport | cityServed | &quot;Aarhus,_Denmark&quot;'], [r["completion"] for r in train])
    two = ("Airport", ["Aarhus | leaderName | Jacob_Bundsgaard", "Aarhus_Airport | cityServed | Aarhus"],
           ["  Two triples.  ", ""])  # spaces around a text are dropped; an empty text is no reference
    city = ("City", ["Atlanta | isPartOf | DeKalb_County,_Georgia"], ["Atlanta is in DeKalb County."])
    challenge = tmp_path / "webnlg-dataset" / "webnlg_challenge_2017"
    _webnlg_xml(challenge / "train" / "2triples" / "Airport.xml", [two])
    _webnlg_xml(challenge / "train" / "1triples" / "City.xml", [city])
    _webnlg_xml(challenge / "train" / "1triples" / "Airport.xml", [aarhus])
    _webnlg_xml(challenge / "dev" / "1triples" / "Airport.xml", [aarhus])
    prepare.prepare("webnlg", tmp_path / "root", tmp_path / "webnlg-dataset")  # the repository or its challenge folder
    rows = [json.loads(line) for line in (tmp_path / "root" / "webnlg" / "train.jsonl").read_text().splitlines()]
    assert rows[:2] == train  # the real rows, field for field
    assert [list(row) for row in rows] == [list(train[0])] * 4  # category, prompt, completion, in that order
    assert rows[2:] == [  # sizes in order, then the categories' files in name order
        {"category": "City", "prompt": "Atlanta | isPartOf | DeKalb County, Georgia",
         "completion": "Atlanta is in DeKalb County."},
        {"category": "Airport", "prompt": "Aarhus | leaderName | Jacob Bundsgaard ; Aarhus Airport | cityServed | Aarhus",
         "completion": "Two triples."}]
    assert (tmp_path / "root" / "webnlg" / "dev.jsonl").read_bytes() == (
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train).encode())
    assert prepare.prepare("webnlg", tmp_path / "again", challenge)[0][1] == 4


# ---------------------------------------------------------------------------- the Hub's copies
class FakeDatasets:
    """``datasets`` with the Hub's records of each set, shaped as the Hub's features are."""

    calls: list = []

    @classmethod
    def load_dataset(cls, name, config, split):
        cls.calls.append((name, config, split))
        if name == "tuetschek/e2e_nlg":
            rows = _csv_rows(DATA / "e2e" / ("trainset.csv" if split == "train" else "devset.csv"), 5)
            return [{"meaning_representation": mr, "human_reference": ref} for mr, ref in rows]
        if name == "nyu-mll/glue":
            lines = (DATA / "sst2" / ("train_full.tsv" if split == "train" else "dev.tsv")).read_text().splitlines()
            return [{"sentence": s, "label": int(label), "idx": i}
                    for i, (s, label) in enumerate(line.split("\t") for line in lines[1:6])]
        entries: dict = {}  # the first 3 real rows, one entry per input, names written as the release does
        for row in _real("train.jsonl" if split == "train" else "dev.jsonl", 3):
            entries.setdefault((row["category"], row["prompt"]), []).append(row["completion"])
        return [{"category": category, "size": prompt.count(" ; ") + 1, "eid": f"Id{i}", "lex": {"text": texts},
                 "modified_triple_sets": {"mtriple_set": [prompt.replace("Aarhus Airport", "Aarhus_Airport").split(" ; ")]}}
                for i, ((category, prompt), texts) in enumerate(entries.items(), start=1)]


def _csv_rows(path, count):
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))[1:count + 1]


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as from the local cache: no reach of the Hub to check
    FakeDatasets.calls = []
    return FakeDatasets


def _head(path, lines: int) -> bytes:
    """The first ``lines`` lines of a real file (E2E's references hold no line breaks)."""
    data = path.read_bytes()
    end = 0
    for _ in range(lines):
        end = data.index(b"\n", end) + 1
    return data[:end]


def test_the_hub_copies_give_the_release_files_bytes(hub, tmp_path):
    for name in ("e2e", "sst2", "webnlg"):
        prepare.prepare(name, tmp_path, None)
    assert hub.calls == [("tuetschek/e2e_nlg", None, "train"), ("tuetschek/e2e_nlg", None, "validation"),
                         ("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "sst2", "validation"),
                         ("webnlg-challenge/web_nlg", "webnlg_challenge_2017", "train"),
                         ("webnlg-challenge/web_nlg", "webnlg_challenge_2017", "dev")]
    for folder, name in [("e2e", "trainset.csv"), ("e2e", "devset.csv"), ("sst2", "train_full.tsv"),
                         ("sst2", "dev.tsv"), ("webnlg", "train.jsonl"), ("webnlg", "dev.jsonl")]:
        lines = 3 if folder == "webnlg" else 6  # WebNLG: 3 rows; the others: the header and 5 rows
        assert (tmp_path / folder / name).read_bytes() == _head(DATA / folder / name, lines), name


def test_without_datasets_the_hub_copy_is_one_line_naming_the_package_and_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["data", "prepare", "sst2", "--out", str(tmp_path)]) == 2
    line = _one_line(capsys)
    assert "pip install datasets" in line and "--from FOLDER" in line
    assert not (tmp_path / "sst2").exists()


# ---------------------------------------------------------------------------- where the files go
def test_prepare_is_idempotent_and_replaces_a_different_file_only_with_force(hub, tmp_path, capsys):
    out = tmp_path / "root"
    argv = ["data", "prepare", "sst2", "--out", str(out)]
    assert main(argv) == 0
    made = (out / "sst2" / "dev.tsv").read_bytes()
    assert main(argv) == 0
    assert f"unchanged {out / 'sst2' / 'dev.tsv'} (5 rows)" in capsys.readouterr().out
    (out / "sst2" / "dev.tsv").write_text("sentence\tlabel\nedited\t1\n")
    assert main(argv) == 2
    assert _one_line(capsys) == (f"prefixtune data: error: {out / 'sst2' / 'dev.tsv'}: exists and differs from what "
                                 "prepare makes; --force replaces it")
    assert (out / "sst2" / "dev.tsv").read_text() == "sentence\tlabel\nedited\t1\n"  # nothing written
    assert main(argv + ["--force"]) == 0
    assert (out / "sst2" / "dev.tsv").read_bytes() == made and not list((out / "sst2").glob("*.part"))


def test_the_data_root_is_out_else_prefixtune_data_else_one_line_naming_it(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    assert main(["data", "prepare", "e2e"]) == 2
    line = _one_line(capsys)
    assert line.startswith("prefixtune data: error: --out: not given, and PREFIXTUNE_DATA is not set")
    assert "docs/data.md" in line and hub.calls == []
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path))
    assert main(["data", "prepare", "e2e"]) == 0
    assert (tmp_path / "e2e" / "trainset.csv").is_file() and "export" not in capsys.readouterr().out


@pytest.mark.parametrize("name, message", [
    ("e2e", "no trainset.csv (the release's files: https://github.com/tuetschek/e2e-dataset/"),
    ("sst2", "no train.tsv (the release's files: https://dl.fbaipublicfiles.com/glue/data/SST-2.zip)"),
    ("webnlg", "no train/1triples/*.xml ... train/7triples/*.xml (the webnlg_challenge_2017 folder of "
               "https://gitlab.com/shimorina/webnlg-dataset)")])
def test_a_release_folder_without_its_files_is_one_line_naming_what_is_missing(name, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "prepare", name, "--from", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert _one_line(capsys).startswith(f"prefixtune data: error: --from {tmp_path / 'empty'}: {message}")


def test_a_release_file_of_another_format_is_named_with_its_line(tmp_path, capsys):
    release = tmp_path / "SST-2"
    release.mkdir()
    (release / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\tnegative\n")
    (release / "dev.tsv").write_text("sentence\tlabel\n")
    assert main(["data", "prepare", "sst2", "--from", str(release), "--out", str(tmp_path)]) == 2
    assert _one_line(capsys) == f"prefixtune data: error: {release / 'train.tsv'}:3: label must be 0 or 1, got 'negative'"


@pytest.mark.parametrize("name, files, bad", [
    ("e2e", {"trainset.csv": b"mr,ref\nname[Caf\xe9],A cafe.\n", "devset.csv": b"mr,ref\n"}, "trainset.csv:2"),
    ("sst2", {"train.tsv": b"sentence\tlabel\ngood\t1\nna\xefve\t0\n", "dev.tsv": b"sentence\tlabel\n"}, "train.tsv:3"),
])
def test_a_release_file_that_is_not_utf8_is_named_with_its_line(name, files, bad, tmp_path, capsys):
    release = tmp_path / "release"
    release.mkdir()
    for file, content in files.items():
        (release / file).write_bytes(content)
    assert main(["data", "prepare", name, "--from", str(release), "--out", str(tmp_path / "out")]) == 2
    assert _one_line(capsys).startswith(f"prefixtune data: error: {release / bad}: not UTF-8 text (byte 0x")


def test_a_file_named_parquet_that_is_not_is_named(tmp_path):
    from prefixtune.data import DataError, load_examples

    fake = tmp_path / "rows.parquet"
    fake.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"{re.escape(str(fake))}:#1: not readable as Parquet \(ArrowInvalid"):
        load_examples(str(fake))
