"""prefixtune.data: every source format, every bad input named by file and line, label masking."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA

from prefixtune.data import (
    DataError,
    Example,
    batches,
    collate,
    group_references,
    load_examples,
    prompt_ids,
    prompt_text,
    tokenize,
)

E2E_DEV = DATA / "e2e" / "devset.csv"
SST2_DEV = DATA / "sst2" / "dev.tsv"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from prefixtune.base_models import bundled_folder

    return AutoTokenizer.from_pretrained(bundled_folder())


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, *records) -> str:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------ formats
def test_jsonl_prompt_completion_skips_blank_lines_and_numbers_by_file_line(tmp_path):
    source = write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": " b", "extra": 1}\n\n'
                                         '{"prompt": "c", "completion": " d"}\n')
    examples = load_examples(source)
    assert [(e.prompt, e.completion) for e in examples] == [("a", " b"), ("c", " d")]
    assert [e.where for e in examples] == [f"{source}:1", f"{source}:3"]
    assert examples[0].fields == {"prompt": "a", "completion": " b", "extra": 1}
    assert examples[0].messages is None and examples[0].label is None


def test_jsonl_chat_takes_last_assistant_message_as_completion(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "name?"},
                {"role": "assistant", "content": "Smol"}]
    [example] = load_examples(jsonl(tmp_path / "chat.jsonl", {"messages": messages}))
    assert example.messages == messages
    assert (example.prompt, example.completion) == ("name?", "Smol")


def test_chat_without_final_reply_is_refused_for_training_but_allowed_for_generation(tmp_path):
    source = jsonl(tmp_path / "chat.jsonl", {"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(DataError, match=rf"{re.escape(source)}:1: .*last message must be a non-empty assistant"):
        load_examples(source)
    [example] = load_examples(source, require_completion=False)
    assert (example.prompt, example.completion) == ("hi", "")


def test_json_list_numbers_records_from_one(tmp_path):
    source = write(tmp_path / "d.json", json.dumps([{"prompt": "a", "completion": "b"},
                                                    {"prompt": "c", "completion": "d"}]))
    examples = load_examples(source)
    assert [e.where for e in examples] == [f"{source}:#1", f"{source}:#2"]
    assert examples[1].completion == "d"


def test_csv_with_quoted_commas_and_newlines_numbers_rows_by_starting_line(tmp_path):
    source = write(tmp_path / "d.csv", 'mr,ref\n"name[A], food[B]","line one\nline two"\n\nplain,"say ""hi"""\n')
    examples = load_examples(source, prompt_field="mr", completion_field="ref")
    assert [(e.prompt, e.completion) for e in examples] == [("name[A], food[B]", "line one\nline two"),
                                                            ("plain", 'say "hi"')]
    assert [e.where for e in examples] == [f"{source}:2", f"{source}:5"]


def test_tsv_reads_quotes_literally_as_glue_needs(tmp_path):
    source = write(tmp_path / "d.tsv", 'sentence\tlabel\n"quoted" start \t1\nit \'s fine\t0\n')
    examples = load_examples(source, text_field="sentence", label_field="label")
    assert [(e.prompt, e.completion, e.label) for e in examples] == [('"quoted" start ', "1", "1"),
                                                                     ("it 's fine", "0", "0")]


def test_tsv_row_with_a_stray_tab_is_an_error_not_a_shifted_label(tmp_path):
    source = write(tmp_path / "d.tsv", "sentence\tlabel\ngood\t1\nbad\ttab\t0\n")
    with pytest.raises(DataError, match=rf"{re.escape(source)}:3: expected 2 fields .* found 3"):
        load_examples(source, text_field="sentence", label_field="label")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["good", "bad"], "label": [1, 0]}), path)
    examples = load_examples(str(path), text_field="text", label_field="label")
    assert [(e.prompt, e.label, e.completion) for e in examples] == [("good", "1", "1"), ("bad", "0", "0")]
    assert examples[1].where == f"{path}:#2"


def test_datasets_local_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    jsonl(folder / "train.jsonl", {"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"})
    examples = load_examples(str(folder), split="train")
    assert [(e.prompt, e.completion) for e in examples] == [("a", "b"), ("c", "d")]
    assert examples[1].where == f"{folder}[train]:#2"


def test_datasets_name_and_config_are_passed_to_load_dataset(monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            calls.append((name, config, split))
            return [{"sentence": "great", "label": 1}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as from the local cache: no reach of the Hub to check
    [example] = load_examples("glue:sst2", split="validation", text_field="sentence", label_field="label")
    assert calls == [("glue", "sst2", "validation")]
    assert (example.prompt, example.label, example.where) == ("great", "1", "glue:sst2[validation]:#1")


def test_missing_datasets_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_examples("glue:sst2")


def test_missing_pyarrow_names_the_pip_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_examples(write(tmp_path / "d.parquet", "not read"))


def test_limit_keeps_the_first_examples_and_reads_no_further(tmp_path):
    source = write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
                                         "{not json\n")
    assert [e.prompt for e in load_examples(source, limit=2)] == ["a", "c"]


def test_missing_completion_allowed_for_generation_inputs(tmp_path):
    source = jsonl(tmp_path / "d.jsonl", {"prompt": "a"}, {"prompt": "b", "completion": ""})
    assert [e.completion for e in load_examples(source, require_completion=False)] == ["", ""]


# ------------------------------------------------------------------------ bad input
def test_malformed_json_names_file_line_and_json_error(tmp_path):
    source = write(tmp_path / "d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
    with pytest.raises(DataError, match=rf"{re.escape(source)}:2: malformed JSON: Expecting"):
        load_examples(source)


def test_non_object_line_is_named(tmp_path):
    source = write(tmp_path / "d.jsonl", '["prompt", "completion"]\n')
    with pytest.raises(DataError, match=rf"{re.escape(source)}:1: expected a JSON object, got list"):
        load_examples(source)


def test_missing_field_names_field_file_and_line(tmp_path):
    source = jsonl(tmp_path / "d.jsonl", {"prompt": "a", "completion": "b"}, {"prompt": "c", "target": "d"})
    message = rf"{re.escape(source)}:2: missing field 'completion' \(available: prompt, target\)"
    with pytest.raises(DataError, match=message):
        load_examples(source)


def test_non_string_field_is_named(tmp_path):
    source = jsonl(tmp_path / "d.jsonl", {"prompt": 3, "completion": "b"})
    with pytest.raises(DataError, match=rf"{re.escape(source)}:1: field 'prompt' must be a string, got int"):
        load_examples(source)


def test_bad_chat_message_is_named(tmp_path):
    source = jsonl(tmp_path / "d.jsonl", {"messages": [{"role": "robot", "content": "x"}]})
    with pytest.raises(DataError, match=rf"{re.escape(source)}:1: field 'messages', message 1: needs a 'role'"):
        load_examples(source)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]"),
                                        ("empty.csv", ""), ("header_only.csv", "mr,ref\n")])
def test_empty_file_has_no_examples(tmp_path, name, text):
    source = write(tmp_path / name, text)
    with pytest.raises(DataError, match=rf"^{re.escape(source)}: no examples$"):
        load_examples(source, prompt_field="mr", completion_field="ref")


def test_missing_csv_column_lists_available_columns():
    message = rf"{re.escape(str(E2E_DEV))}:2: missing field 'meaning' \(available: mr, ref\)"
    with pytest.raises(DataError, match=message):
        load_examples(str(E2E_DEV), prompt_field="meaning", completion_field="ref")


def test_missing_file_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # a Hub attempt would raise ImportError instead
    for source in [str(tmp_path / "missing.jsonl"), str(tmp_path / "missing"), "./missing", "missing.csv",
                   "sub/dir/missing", "~/no-such-prefixtune-data"]:
        with pytest.raises(DataError, match=rf"^{re.escape(source)}: file not found$"):
            load_examples(source)


def test_unsupported_file_type_is_named(tmp_path):
    source = write(tmp_path / "d.txt", "hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_examples(source)


def test_bad_template_key_names_key_template_and_record(tmp_path):
    [example] = load_examples(jsonl(tmp_path / "d.jsonl", {"prompt": "a", "completion": "b"}))
    message = rf"{re.escape(example.where)}: template 'Q: {{question}}' needs field 'question'"
    with pytest.raises(DataError, match=message):
        prompt_text(example, "Q: {question}")


def test_overflow_fail_names_record_length_and_limit(tokenizer):
    example = Example(prompt="one two three four five", completion=" six", fields={}, where="d.jsonl:7")
    with pytest.raises(DataError, match=r"^d\.jsonl:7: 7 tokens \(prompt 5 \+ completion 2\) exceed max_length 4$"):
        tokenize([example], tokenizer, max_length=4, overflow="fail")


def test_unknown_overflow_policy_is_a_value_error(tokenizer):
    with pytest.raises(ValueError, match="overflow must be one of"):
        tokenize([], tokenizer, max_length=8, overflow="drop")


# ------------------------------------------------------------------------ templates and tokens
def test_template_sees_prompt_and_raw_fields():
    example = Example(prompt="name[A]", completion="x", fields={"mr": "name[A]", "topic": "food"})
    assert prompt_text(example, "Table ({topic}): {prompt}\nText:") == "Table (food): name[A]\nText:"
    assert prompt_text(example, None) == "name[A]"


def test_prompt_labels_are_masked_completion_and_eos_labelled(tokenizer):
    example = Example(prompt="name[A]", completion=" A is nice.", fields={}, where="x:1")
    [row], report = tokenize([example], tokenizer, max_length=64, template="Table: {prompt}\nText:")
    prompt, completion = ids(tokenizer, "Table: name[A]\nText:"), ids(tokenizer, " A is nice.")
    eos = tokenizer.eos_token_id
    assert row["input_ids"] == prompt + completion + [eos]
    assert row["labels"] == [-100] * len(prompt) + completion + [eos]
    assert report == {"examples": 1, "truncated": [], "tokens": len(row["input_ids"])}
    assert prompt_ids(example, tokenizer, template="Table: {prompt}\nText:") == prompt


def test_truncation_cuts_the_prompt_from_the_left_and_is_counted(tokenizer):
    long = Example(prompt="one two three four five six", completion=" end", fields={}, where="d:1")
    short = Example(prompt="hi", completion=" end", fields={}, where="d:2")
    huge = Example(prompt="hi", completion=" a b c d e f g h", fields={}, where="d:3")
    rows, report = tokenize([long, short, huge], tokenizer, max_length=5)
    completion = ids(tokenizer, " end") + [tokenizer.eos_token_id]
    assert rows[0]["input_ids"] == ids(tokenizer, "one two three four five six")[-3:] + completion
    assert rows[0]["labels"] == [-100] * 3 + completion
    assert rows[1]["input_ids"] == ids(tokenizer, "hi") + completion
    assert rows[2]["input_ids"] == rows[2]["labels"] == ids(tokenizer, " a b c d e f g h")[:5]
    assert report["truncated"] == ["d:1", "d:3"]
    assert report["tokens"] == sum(len(r["input_ids"]) for r in rows)


def test_prompt_ids_keep_the_end_of_a_long_prompt(tokenizer):
    example = Example(prompt="one two three four five six", completion="", fields={})
    assert prompt_ids(example, tokenizer, max_length=2) == ids(tokenizer, "one two three four five six")[-2:]


def test_chat_examples_mask_everything_up_to_the_generation_prompt(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    [example] = load_examples(jsonl(tmp_path / "chat.jsonl", {"messages": messages}))
    [row], _ = tokenize([example], tokenizer, max_length=128)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages)["input_ids"]
    assert row["input_ids"] == full
    assert row["labels"] == [-100] * len(prompt) + full[len(prompt):]
    assert tokenizer.decode(full[len(prompt):]) == "yo<|im_end|>\n"  # ends in eos: nothing appended
    assert prompt_ids(example, tokenizer) == prompt


def test_chat_template_flag_wraps_prompt_completion_data_as_one_turn(tokenizer):
    example = Example(prompt="name[A]", completion="A is nice.", fields={})
    [row], _ = tokenize([example], tokenizer, max_length=128, template="Describe: {prompt}", chat_template=True)
    messages = [{"role": "user", "content": "Describe: name[A]"}, {"role": "assistant", "content": "A is nice."}]
    assert row["input_ids"] == tokenizer.apply_chat_template(messages)["input_ids"]
    generation = prompt_ids(example, tokenizer, template="Describe: {prompt}", chat_template=True)
    assert generation == tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)["input_ids"]
    assert row["labels"][:len(generation)] == [-100] * len(generation)
    assert all(label != -100 for label in row["labels"][len(generation):])


def test_chat_template_whose_prompt_is_not_a_prefix_is_refused(tokenizer, monkeypatch):
    odd = ("{% if add_generation_prompt %}ASK:{% else %}TALK:{% endif %}"
           "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.setattr(tokenizer, "chat_template", odd)
    example = Example(prompt="hi", completion="yo", fields={}, where="c.jsonl:3")
    with pytest.raises(DataError, match=r"^c\.jsonl:3: the chat template's prompt .* not .* a prefix"):
        tokenize([example], tokenizer, max_length=64, chat_template=True)


# ------------------------------------------------------------------------ real data
def test_e2e_dev_groups_into_547_meaning_representations():
    examples = load_examples(str(E2E_DEV), prompt_field="mr", completion_field="ref")
    groups = group_references(examples)
    assert len(examples) == 4672 and len(groups) == 547
    assert sum(len(references) for _, references in groups) == 4672
    first, references = groups[0]
    assert first.prompt == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert references[0] == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert len({example.prompt for example, _ in groups}) == 547


def test_sst2_dev_has_872_labelled_sentences():
    examples = load_examples(str(SST2_DEV), text_field="sentence", label_field="label")
    assert len(examples) == 872
    assert {e.label for e in examples} == {"0", "1"}
    assert all(e.completion == e.label for e in examples)
    assert examples[0].prompt == "it 's a charming and often affecting journey . "
    assert examples[0].where == f"{SST2_DEV}:2"


def test_group_references_keys_chat_data_on_the_conversation_before_the_reply():
    def chat(system, reply):
        return Example(prompt="q", completion=reply, fields={}, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": reply}])

    groups = group_references([chat("a", "1"), chat("b", "2"), chat("a", "3")])
    assert [references for _, references in groups] == [["1", "3"], ["2"]]


# ------------------------------------------------------------------------ batches
def test_collate_pads_right_with_masked_labels():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batches_are_deterministic_per_seed_and_epoch_and_keep_the_last_partial_batch():
    rows = [{"input_ids": [i], "labels": [i]} for i in range(10)]

    def order(**kwargs):
        return [[row["input_ids"][0] for row in batch] for batch in batches(rows, 4, **kwargs)]

    first = order(seed=1, epoch=0)
    assert first == order(seed=1, epoch=0)
    assert first != order(seed=1, epoch=1) and first != order(seed=2, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10))
    assert order(seed=1, epoch=0, shuffle=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# ---------------------------------------------------------------------------- filters by field
def _categories(tmp_path) -> str:
    rows = [{"category": c, "prompt": f"{c} {i} |", "completion": f"text {i}"}
            for i, c in enumerate(["City", "Food", "Airport", "City", "Monument", "Astronaut"])]
    return write(tmp_path / "cats.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def test_where_keeps_or_drops_the_named_values_and_rows_keep_their_fields(tmp_path):
    from prefixtune.data.filters import Where

    source = _categories(tmp_path)
    unseen = load_examples(source, keep=Where.parse("category=City, Food,Monument", "--eval-where"))
    assert [ex.fields["category"] for ex in unseen] == ["City", "Food", "City", "Monument"]
    seen = load_examples(source, keep=Where.parse("category!=City,Food,Monument", "--train-where"))
    assert [ex.fields["category"] for ex in seen] == ["Airport", "Astronaut"]
    assert seen[0].fields == {"category": "Airport", "prompt": "Airport 2 |", "completion": "text 2"}
    # the limit counts the rows the filter keeps
    assert len(load_examples(source, limit=3, keep=Where.parse("category=City,Food,Monument", "--eval-where"))) == 3


def test_where_compares_values_as_text_in_csv_and_json_alike(tmp_path):
    from prefixtune.data.filters import Where

    tsv = write(tmp_path / "s.tsv", "sentence\tlabel\ngood\t1\nbad\t0\nfine\t1\n")
    kept = load_examples(tsv, text_field="sentence", label_field="label", keep=Where.parse("label=1", "--train-where"))
    assert [ex.prompt for ex in kept] == ["good", "fine"]
    jsonl = write(tmp_path / "n.jsonl", '{"prompt": "a", "completion": "b", "n": 1}\n{"prompt": "c", "completion": "d", "n": 2}\n')
    assert [ex.prompt for ex in load_examples(jsonl, keep=Where.parse("n!=2", "--train-where"))] == ["a"]


@pytest.mark.parametrize("text", ["category", "category=", "=City", "category=,", "cat=egory=x", "a!b=c"])
def test_a_filter_of_bad_syntax_says_what_it_expects(text):
    from prefixtune.data.filters import Where

    with pytest.raises(ValueError, match=r"expected FIELD=V1,V2,\.\.\. .* got"):
        Where.parse(text, "--train-where")


def test_a_filter_on_a_missing_field_or_that_keeps_nothing_names_itself(tmp_path):
    from prefixtune.data.filters import Where

    source = _categories(tmp_path)
    with pytest.raises(ValueError, match=r"cats\.jsonl:1: --train-where 'categry=City' names field 'categry'.*"
                                         r"fields: category, prompt, completion"):
        load_examples(source, keep=Where.parse("categry=City", "--train-where"))
    with pytest.raises(DataError, match=r"cats\.jsonl: --eval-where 'category=Pasta' keeps no row"):
        load_examples(source, keep=Where.parse("category=Pasta", "--eval-where"))


# ------------------------------------------------------------------------ hostile inputs
def _finishes(call, seconds=60.0):
    """``call()``'s result or exception, or a failure if it is still running after ``seconds`` (a hang)."""
    import threading

    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a FIFO was opened"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_fifo_in_a_data_folder_is_refused_not_waited_on(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl(folder / "train.jsonl", {"prompt": "a", "completion": "b"})
    os.mkfifo(folder / "pipe.jsonl")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'pipe.jsonl'))}: not a regular file"):
        _finishes(lambda: load_examples(str(folder)))
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'pipe.jsonl'))}: not a regular file"):
        _finishes(lambda: load_examples(str(folder / "pipe.jsonl")))


def test_a_data_folder_holding_a_fifo_is_one_line_from_the_command_line(model_dir, tmp_path, capsys):
    from prefixtune.cli import main

    folder = tmp_path / "folder"
    folder.mkdir()
    jsonl(folder / "train.jsonl", {"prompt": "a", "completion": "b"})
    os.mkfifo(folder / "fifo")
    code = _finishes(lambda: main(["train", "--model", model_dir, "--data", str(folder), "--max-steps", "1",
                                   "--output-dir", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{folder / 'fifo'}: not a regular file" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template", ["{mr.__class__}", "{mr.__class__.__init__.__globals__}", "{mr[0]}", "{mr!r}",
                                      "{mr:>{width}}", "{mr:x}", "{}", "{0}", "Table: {mr", "}"])
def test_a_template_may_hold_plain_field_names_only(template):
    example = Example(prompt="p", completion="c", fields={"mr": "name[A]", "width": 9})
    with pytest.raises(DataError, match=r"^--prompt-template: "):
        prompt_text(example, template)


def test_plain_fields_literal_braces_and_column_names_with_spaces_fill_a_template():
    example = Example(prompt="p", completion="c", fields={"mr": "name[A]", "customer rating": "5"})
    assert prompt_text(example, "{{mr}} {mr} ({customer rating}) {prompt}") == "{mr} name[A] (5) p"


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_template_reaching_attributes_is_one_line_naming_the_option(command, model_dir, tmp_path, capsys):
    from prefixtune.cli import main

    source = jsonl(tmp_path / "d.jsonl", {"mr": "name[A]", "ref": "A."})
    argv = [command, "--model", model_dir, "--data", source, "--prompt-field", "mr", "--completion-field", "ref",
            "--prompt-template", "{mr.__class__}"]
    code = main(argv + (["--max-steps", "1", "--output-dir", str(tmp_path / "out")] if command == "train" else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"prefixtune {command}: error: --prompt-template: {{mr.__class__}} is not allowed")
    assert not (tmp_path / "out").exists()
