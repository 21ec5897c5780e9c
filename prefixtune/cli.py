"""The ``prefixtune`` command line: thin argument parsing over the library.

Options are generated from the config dataclasses in :mod:`prefixtune.config`. Bad input
ends in one clear line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from . import __version__, options
from .config import EvalConfig, GenerateConfig, TrainConfig

COMMANDS = {
    "train": (TrainConfig, "train a prefix (no arguments: a built-in demo task on the bundled model)",
              "Train a prefix on --data (JSONL, CSV/TSV, Parquet or a datasets name) and evaluate it on "
              "--eval-data against the base model. With no arguments it trains on a built-in demo task "
              "(restaurant attributes -> one sentence) on the bundled SmolLM2-135M-Instruct, in a few minutes "
              "on 2 CPU cores. The defaults are the recipe a study on E2E, WebNLG and SST-2 chose: a 10-position "
              "key/value prefix through the paper's MLP with its weight matrices at the rate / width, AdamW at "
              "3e-2, 10 warmup steps, no clipping (docs/training.md, 'The default recipe', says what it measured "
              "and when to pick LoRA instead). The run's full configuration is written to OUTPUT_DIR/config.yaml; "
              "replay it with --config OUTPUT_DIR/config.yaml, overriding any option on the command line."),
    "eval": (EvalConfig, "score a saved prefix (or the base model) on a dataset",
             "Loss, perplexity and generation metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr computed per distinct "
             "prompt against all its references, as the E2E scorer does; accuracy for classification)."),
    "generate": (GenerateConfig, "generate with a saved prefix",
                 "Complete --prompt, or every prompt of --input, with the prefix in --prefix."),
}

# Commands whose arguments are not one config dataclass live in their own modules, as a module
# or a module's attribute ("module:NAME") that provides SUMMARY, DESCRIPTION, add_arguments(parser)
# and run(args) -> exit code, and imports its heavy dependencies inside run(), so that
# `prefixtune --help` stays fast.
MODULE_COMMANDS: dict[str, str] = {
    "compare": "prefixtune.compare",
    "data": "prefixtune.data.cli",
    "export-peft": "prefixtune.peft.cli:EXPORT",
    "import-peft": "prefixtune.peft.cli:IMPORT",
    "serve": "prefixtune.serve.cli",
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _quiet_logging()
    try:
        if args.command in MODULE_COMMANDS:
            return _command(args.command).run(args) or 0
        config = options.build(COMMANDS[args.command][0], args, args.config)
        return RUNNERS[args.command](config) or 0
    except KeyboardInterrupt:
        print(f"prefixtune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command line shows a message, not a traceback
        if not _expected(err):
            return _internal_error(args.command, err)
        print(f"prefixtune {args.command}: error: {err}", file=sys.stderr)
        return 1 if type(err).__name__ in ("TrainingError", "Diverged") else 2


def _expected(err: Exception) -> bool:
    """Errors that say what is wrong with the input, the files or the machine, in their message."""
    from .train import TrainingError

    return isinstance(err, (ValueError, OSError, KeyError, NotImplementedError, TrainingError, TypeError))


def _internal_error(command: str, err: Exception) -> int:
    """An error no check anticipated: one line on stderr, the traceback kept in a file for a bug report."""
    import tempfile
    import traceback

    with tempfile.NamedTemporaryFile("w", prefix="prefixtune-traceback-", suffix=".txt", delete=False) as f:
        traceback.print_exception(err, file=f)
    from .messages import first_line

    print(f"prefixtune {command}: internal error: {first_line(err)} (this is a bug; the traceback is in {f.name})",
          file=sys.stderr)
    return 3


class _Parser(argparse.ArgumentParser):
    """argparse, telling a mistake in two lines: the error, and where to read more. Its own usage
    line lists every option of a command (about 40 lines for ``train``), which buries the one that was wrong."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="prefixtune",
        description="Prefix tuning (Li & Liang 2021) for Hugging Face transformers models: the base model stays "
        "frozen; each attention layer gets a few trainable key/value positions.",
    )
    parser.add_argument("--version", action="version", version=f"prefixtune {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (config_cls, summary, description) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=description)
        sub.add_argument("--config", default=None, metavar="FILE",
                         help="YAML/JSON file of options (a run's config.yaml); command-line options override it")
        options.add_options(sub, config_cls)
    for name in MODULE_COMMANDS:
        command = _command(name)
        command.add_arguments(commands.add_parser(name, help=command.SUMMARY, description=command.DESCRIPTION))
    return parser


def _command(name: str):
    """The module (or the module's attribute) that implements command ``name``."""
    module, _, attribute = MODULE_COMMANDS[name].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


def _quiet_logging() -> None:
    """The command line speaks in its own words: libraries below it say errors only. bitsandbytes, imported
    with PEFT, otherwise warns on every run of a CPU with bf16 instructions that it could not fetch a kernel
    from the Hub and suggests ``trust_remote_code``, which prefixtune never sets for the user."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _train(cfg: TrainConfig) -> int:
    from .train import train

    train(cfg)
    return 0


def _eval(cfg: EvalConfig) -> int:
    from . import data, evaluate
    from .data import filters
    from .metrics import check_available
    from .options import split_list

    if not cfg.data:
        raise ValueError("--data is required: the examples to score")
    if cfg.task == "classification":
        return _eval_classes(cfg)
    metrics = split_list(cfg.metrics)
    check_available(metrics)
    examples = data.load_examples(cfg.data, **cfg.source_fields(), limit=cfg.limit,
                                  keep=filters.parsed(cfg.eval_where, "eval_where"))
    pm, tokenizer = _load(cfg)
    prefix, label = ("default", "with prefix") if cfg.prefix else (None, "base model")
    if cfg.group_by:
        result = evaluate.score_by(pm, tokenizer, examples, cfg, prefix=prefix, metrics=metrics, field=cfg.group_by)
        print(evaluate.table({f"{label}, all": result, **{f"  {value}": row for value, row in result["groups"].items()}},
                             metrics))
    else:
        result = evaluate.score(pm, tokenizer, examples, cfg, prefix=prefix, metrics=metrics)
        print(evaluate.table({label: result}, metrics))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"metrics written to {cfg.output}")
    return 0


def _eval_classes(cfg: EvalConfig) -> int:
    """Accuracy of a classifier prefix (its task head is saved with it)."""
    from . import data, evaluate
    from .data import filters
    from .base_models import class_names

    if not cfg.prefix:
        raise ValueError("--task classification needs --prefix: the task head is trained with the prefix")
    examples = data.load_examples(cfg.data, **cfg.source_fields(), limit=cfg.limit,
                                  keep=filters.parsed(cfg.eval_where, "eval_where"))
    pm, tokenizer = _load(cfg)
    labels = class_names(pm.model)
    rows, _ = data.tokenize_classes(examples, tokenizer, labels, max_length=cfg.max_length)
    result = evaluate.classify(pm, rows, tokenizer.pad_token_id, batch_size=cfg.batch_size, prefix="default")
    result["predictions"] = [labels[i] for i in result["predictions"]]
    print(evaluate.table({"with prefix": result}, ["accuracy"]))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"metrics written to {cfg.output}")
    return 0


def _generate(cfg: GenerateConfig) -> int:
    import torch

    from . import data, evaluate

    if (cfg.prompt is None) == (cfg.input is None):
        raise ValueError("give exactly one of --prompt TEXT or --input FILE")
    examples = ([data.Example(prompt=cfg.prompt, completion="", fields={"prompt": cfg.prompt}, where="--prompt")]
                if cfg.prompt is not None else
                data.load_examples(cfg.input, **cfg.source_fields(), require_completion=False))
    pm, tokenizer = _load(cfg)
    if cfg.task == "classification":
        texts = evaluate.predict_labels(pm, tokenizer, [ex.prompt for ex in examples], batch_size=cfg.batch_size,
                                        max_length=cfg.max_length, prefix="default" if cfg.prefix else None)
        return _print_generations(cfg, examples, texts, key="label")
    torch.manual_seed(cfg.seed)
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p) if cfg.do_sample else {}
    texts = evaluate.generate_texts(pm, tokenizer, examples, cfg, prefix="default" if cfg.prefix else None, **sampling)
    return _print_generations(cfg, examples, texts)


def _print_generations(cfg: GenerateConfig, examples: list, texts: list[str], key: str = "generation") -> int:
    lines = [json.dumps({"prompt": ex.prompt, key: t}) for ex, t in zip(examples, texts)]
    if cfg.output:
        Path(cfg.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{len(lines)} generations written to {cfg.output}")
    elif cfg.prompt is not None:
        print(texts[0])
    else:
        print("\n".join(lines))
    return 0


def _load(cfg):
    from .base_models import load_model
    from .model import PrefixModel
    from .runtime import pick_device

    device = pick_device(cfg.device)  # before the model loads: a machine without it is told at once
    labels = None
    if cfg.task == "classification" and cfg.prefix:
        from .artifacts import read_meta

        labels = read_meta(cfg.prefix).get("labels")
        if not labels:
            raise ValueError(f"{cfg.prefix}: this prefix has no task head; it was not trained with --task classification")
    model, tokenizer = load_model(cfg.model, task=cfg.task, labels=labels, attn_implementation=cfg.attn_implementation)
    model.to(device)
    pm = PrefixModel.from_pretrained(model, cfg.prefix) if cfg.prefix else PrefixModel(model)
    return pm, tokenizer


RUNNERS = {"train": _train, "eval": _eval, "generate": _generate}

if __name__ == "__main__":
    sys.exit(main())
