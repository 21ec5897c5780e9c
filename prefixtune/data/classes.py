"""Examples -> token rows of a sequence-classification task (an encoder and its task head).

Used by ``--task classification`` (P-Tuning v2, Liu et al. 2022: deep prefixes on encoders such
as BERT, trained with the head); the label of each row is a class id, not a token sequence.
"""

from __future__ import annotations

from .example import DataError, Example, where_of
from .tokens import encode, report_of


def label_names(examples: list[Example]) -> list[str]:
    """The classes of classification examples, in id order: numerically if every label is
    an integer (GLUE's "0"/"1"), else alphabetically."""
    names = sorted({ex.label for ex in examples if ex.label is not None})
    if not names:
        raise DataError("no example has a label: give --text-field and --label-field for classification data")
    if all(name.lstrip("-").isdigit() for name in names):
        names.sort(key=int)
    return names


def tokenize_classes(examples: list[Example], tokenizer, labels: list[str], *,
                     max_length: int) -> tuple[list[dict], dict]:
    """Token rows of a sequence-classification task: ``{"input_ids": [CLS] text [SEP], "labels": class id}``.

    Texts longer than ``max_length`` tokens are cut at the end (the tokenizer keeps its
    closing special token) and listed in ``report["truncated"]``. A label outside
    ``labels`` (the training set's classes) is an error naming the example.
    """
    ids = {name: i for i, name in enumerate(labels)}
    rows, truncated = [], []
    for example in examples:
        if example.label not in ids:
            raise DataError(f"{where_of(example)}: label {example.label!r} is not one of the training labels "
                            f"({', '.join(labels)})")
        tokens = encode(tokenizer, example.prompt, special=True)
        if len(tokens) > max_length:  # let the tokenizer cut, so that it keeps its closing special token
            tokens = tokenizer(example.prompt, truncation=True, max_length=max_length)["input_ids"]
            truncated.append(where_of(example))
        rows.append({"input_ids": list(tokens), "labels": ids[example.label]})
    return rows, report_of(rows, truncated)
