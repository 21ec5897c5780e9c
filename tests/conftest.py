import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_model_folder  # noqa: E402

DATA = Path(os.environ.get("PREFIXTUNE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
"""The real data sets (e2e/, webnlg/, sst2/; docs/data.md): ``$PREFIXTUNE_DATA``, else the shared folder beside
the checkout, where CI keeps them."""


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama with the bundled model's real tokenizer, saved as a model folder."""
    return str(tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """``train.jsonl`` (12 prompt/completion rows) and ``eval.jsonl`` (the first 4 of them)."""
    folder = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"colour[{c}], size[{s}] ->", "completion": f" a {s} {c} thing"}
            for c in ("red", "green", "blue", "black") for s in ("big", "small", "tiny")]
    for name, subset in (("train.jsonl", rows), ("eval.jsonl", rows[:4])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in subset))
    return folder


@pytest.fixture(scope="session")
def until():
    """``until(condition, timeout=30.0)``: wait for ``condition()`` to hold; False if it does not in time."""
    def wait(condition, timeout=30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True
    return wait
