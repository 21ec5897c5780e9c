"""``prefixtune train/eval/generate --task classification`` end to end on a tiny random BERT
with the bundled MiniLM's tokenizer: the prefix and the task head train together, are saved
together, and score the same when reloaded."""

import csv
import json

import pytest
import torch
import transformers as tf

from prefixtune.base_models import minilm_folder
from prefixtune.cli import main

WORDS = {"1": ["good", "great", "lovely", "fine"], "0": ["bad", "awful", "dull", "poor"]}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "model"
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_folder())
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64,
                           initializer_range=0.3)  # random features that differ by word, so the task is learnable
    tf.BertModel(config).save_pretrained(folder)  # a base encoder without a head, as MiniLM ships
    tokenizer.save_pretrained(folder)
    return str(folder)


def _tsv(path, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t")
        out.writerow(["sentence", "label"])
        for i in range(rows):
            label = str(i % 2)
            word = WORDS[label][int(torch.randint(4, (1,), generator=generator))]
            out.writerow([f"the film was {word} ,  really {word}", label])
    return str(path)


@pytest.fixture(scope="module")
def run(encoder_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    train = dev = _tsv(folder / "train.tsv", 16, 1)  # can prefix + head fit what they see (a random encoder)?
    out = folder / "out"
    fields = ["--task", "classification", "--model", encoder_dir, "--text-field", "sentence", "--label-field", "label"]
    assert main(["train", *fields, "--data", train, "--eval-data", dev, "--output-dir", str(out), "--max-steps", "40",
                 "--batch-size", "16", "--lr", "3e-2", "--no-reparameterize", "--prefix-length", "8",
                 "--metric", "accuracy", "--eval-every", "10"]) == 0
    return fields, dev, out


def test_prefix_and_head_learn_the_task(run):
    _, _, out = run
    scores = json.loads((out / "eval.json").read_text())
    assert scores["majority class"]["accuracy"] == 50.0
    assert scores["with prefix"]["accuracy"] >= 75.0  # 81.25 when written; chance is 50
    meta = json.loads((out / "prefix_config.json").read_text())
    assert meta["labels"] == ["0", "1"] and meta["base"]["groups"] == {"encoder": 2}


def test_eval_and_generate_reload_prefix_and_head(run, tmp_path, capsys):
    fields, dev, out = run
    target = tmp_path / "metrics.json"
    assert main(["eval", *fields, "--prefix", str(out), "--data", dev, "--output", str(target)]) == 0
    result = json.loads(target.read_text())
    assert result["accuracy"] == json.loads((out / "eval.json").read_text())["with prefix"]["accuracy"]
    assert set(result["predictions"]) <= {"0", "1"}
    capsys.readouterr()
    first = next(csv.DictReader(open(dev), delimiter="\t"))["sentence"]
    assert main(["generate", *fields, "--prefix", str(out), "--prompt", first]) == 0
    assert capsys.readouterr().out.strip() == result["predictions"][0]  # the same prediction as eval's


def test_classification_without_data_or_with_a_text_metric_is_refused(encoder_dir, capsys):
    assert main(["train", "--task", "classification", "--model", encoder_dir]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["train", "--task", "classification", "--model", encoder_dir, "--data", "x.tsv",
                 "--metric", "bleu"]) == 2
    assert "scored by loss or accuracy" in capsys.readouterr().err


def test_classification_eval_needs_a_prefix_with_a_head(encoder_dir, model_dir, data_files, tmp_path, capsys):
    assert main(["eval", "--task", "classification", "--model", encoder_dir, "--data", "x.tsv"]) == 2
    assert "needs --prefix" in capsys.readouterr().err
    lm_prefix = tmp_path / "lm"
    assert main(["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--max-steps", "1",
                 "--prefix-length", "2", "--reparam-hidden-size", "8", "--output-dir", str(lm_prefix)]) == 0
    capsys.readouterr()
    assert main(["generate", "--task", "classification", "--model", encoder_dir, "--prefix", str(lm_prefix),
                 "--prompt", "fine"]) == 2
    assert "this prefix has no task head" in capsys.readouterr().err


def test_an_unseen_label_in_eval_data_names_the_line(run, tmp_path, capsys):
    fields, _, out = run
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nodd\t7\n")
    assert main(["eval", *fields, "--prefix", str(out), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv" in err and "'7' is not one of the training labels (0, 1)" in err


def test_long_texts_are_cut_keeping_the_closing_token_and_counted():
    from prefixtune import data

    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_folder())
    examples = [data.Example(prompt=text, completion=label, fields={}, label=label, where=f"row {i}")
                for i, (text, label) in enumerate([("short one", "0"), ("a much longer text " * 5, "1")])]
    rows, report = data.tokenize_classes(examples, tokenizer, ["0", "1"], max_length=8)
    assert report["truncated"] == ["row 1"]
    assert len(rows[1]["input_ids"]) == 8 and rows[1]["input_ids"][-1] == tokenizer.sep_token_id
    assert rows[0]["input_ids"] == tokenizer("short one")["input_ids"] and [r["labels"] for r in rows] == [0, 1]
