"""Files -> examples -> tokens (prompt labels masked) -> batches.

Prefix tuning trains a conditional model ``p(completion | prompt)`` (Li & Liang 2021, section 4),
so every source is first read into :class:`Example` s (a prompt and a completion, plus the raw
record), then tokenized into rows whose prompt positions carry the label ``-100``. One module
per step, each importing only the ones before it:

- :mod:`.example`: :class:`Example` and :class:`DataError`;
- :mod:`.filters`: ``--train-where`` / ``--eval-where`` row filters;
- :mod:`.readers`: JSONL, JSON, CSV/TSV, Parquet and ``datasets`` sources -> raw records;
- :mod:`.load`: raw records -> checked examples (:func:`load_examples`);
- :mod:`.templates`: prompt templates and chat form;
- :mod:`.references`: examples grouped per prompt (multi-reference scoring) or per field value;
- :mod:`.tokens`: examples -> token rows with the prompt masked;
- :mod:`.classes`: token rows of a classification task;
- :mod:`.batches`: rows -> padded tensors, in a reproducible order.
"""

from .batches import BatchOrder, batches, collate
from .classes import label_names, tokenize_classes
from .example import DataError, Example
from .filters import Where
from .load import load_examples, select
from .readers import FILE_TYPES
from .references import group_references, partition
from .templates import check_template, prompt_text
from .tokens import IGNORE, eos_id, prompt_ids, tokenize

__all__ = [
    "FILE_TYPES", "IGNORE", "BatchOrder", "DataError", "Example", "Where", "batches", "check_template", "collate",
    "eos_id", "group_references", "label_names", "load_examples", "partition", "prompt_ids", "prompt_text", "select",
    "tokenize", "tokenize_classes",
]
