"""``prefixtune compare``: the same task, data, step budget and seed under several methods.

Prefix tuning (prefixtune's, and PEFT's), prompt tuning, LoRA, QLoRA (PEFT), bottleneck
adapters (a small Houlsby implementation in :mod:`.adapters`) and full fine-tuning, each on a
freshly loaded copy of the base model; the result is one table of trainable parameters,
peak memory, seconds per step, tokens per second, checkpoint size and the task metrics, as
Markdown, JSON and a plot. Modules: :mod:`.config` (the options), :mod:`.methods` (the
methods, as data), :mod:`.adapters`, :mod:`.runner` (training and measuring), :mod:`.report`.

This module stays light (the command line imports it to build ``--help``); the heavy
imports happen in :func:`run`.
"""

from __future__ import annotations

import argparse
import sys

SUMMARY = "run the same task under prefix tuning, LoRA, QLoRA, adapters, prompt tuning and full fine-tuning"
DESCRIPTION = (
    "Train each --methods on the same data, for the same --max-steps of the same --batch-size, from the same "
    "--seed, and score each on the same held-out prompts. Prints the table (trainable parameters and their share, "
    "peak memory, seconds per step, tokens/s, checkpoint size, training loss and the --metrics) and writes it to "
    "OUTPUT_DIR as compare.md, compare.json and compare.png. With no --data it runs on the built-in demo task; "
    "--quick makes a smoke run of a few minutes on CPU. See docs/compare.md."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .. import options
    from .config import CompareConfig

    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML/JSON file of options (see configs/compare-e2e.yaml); command-line options override it")
    parser.add_argument("--list-methods", action="store_true", help="list the methods and their default rates, and exit")
    options.add_options(parser, CompareConfig)


def build_config(args: argparse.Namespace):
    """The CompareConfig of parsed arguments: defaults < --quick < --config file < command line."""
    from .. import options
    from .config import QUICK, CompareConfig

    names = {o.name for o in options.options_of(CompareConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    from_file = options.load_file(args.config, CompareConfig) if getattr(args, "config", None) else {}
    quick = given.get("quick", from_file.get("quick", False))
    return options.from_flat(CompareConfig, {**(QUICK if quick else {}), **from_file, **given})


def run(args: argparse.Namespace) -> int:
    if getattr(args, "list_methods", False):
        from .methods import listing

        print(listing())
        return 0
    from .runner import compare

    results = compare(build_config(args))
    failed = [r["method"] for r in results["rows"] if r["status"] == "failed"]
    if failed:
        print(f"prefixtune compare: {', '.join(failed)} failed (see the table)", file=sys.stderr)
        return 1
    return 0


def __getattr__(name: str):
    if name in ("compare", "run_method"):
        from . import runner

        return getattr(runner, name)
    if name == "CompareConfig":
        from .config import CompareConfig

        return CompareConfig
    raise AttributeError(name)
