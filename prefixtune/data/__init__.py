"""Files -> examples -> tokens (prompt labels masked) -> batches.

Prefix tuning trains a conditional model ``p(completion | prompt)`` (Li & Liang 2021, section 4),
so every source is first read into :class:`Example` s (a prompt and a completion, plus the raw
record), then tokenized into rows whose prompt positions carry the label ``-100``. One module
per step, each importing only the ones before it:

- :mod:`.example`: :class:`Example` and :class:`DataError`;
- :mod:`.location`: the data root, ``$PREFIXTUNE_DATA`` (docs/data.md);
- :mod:`.filters`: ``--train-where`` / ``--eval-where`` row filters;
- :mod:`.readers`: JSONL, JSON, CSV/TSV, Parquet and ``datasets`` sources -> raw records;
- :mod:`.load`: raw records -> checked examples (:func:`load_examples`);
- :mod:`.templates`: prompt templates and chat form;
- :mod:`.references`: examples grouped per prompt (multi-reference scoring) or per field value;
- :mod:`.tokens`: examples -> token rows with the prompt masked;
- :mod:`.classes`: token rows of a classification task;
- :mod:`.batches`: rows -> padded tensors, in a reproducible order;
- :mod:`.prepare` and :mod:`.cli`: ``prefixtune data prepare`` (E2E, WebNLG, SST-2 into the data root).
"""

from .batches import BatchOrder, batches, collate
from .classes import label_names, tokenize_classes
from .example import DataError, Example
from .filters import Where
from .load import load_examples, select
from .location import VARIABLE, NoDataRoot, root
from .readers import FILE_TYPES, check_source
from .references import group_references, partition
from .templates import check_template, prompt_text
from .tokens import IGNORE, eos_id, prompt_ids, tokenize

__all__ = [
    "FILE_TYPES", "IGNORE", "VARIABLE", "BatchOrder", "DataError", "Example", "NoDataRoot", "Where", "batches",
    "check_source", "check_template", "collate", "eos_id", "group_references", "label_names", "load_examples", "partition",
    "prompt_ids", "prompt_text", "root", "select", "tokenize", "tokenize_classes",
]
