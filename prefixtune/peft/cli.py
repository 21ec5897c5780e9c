"""``prefixtune export-peft`` and ``prefixtune import-peft``: the commands; the conversion lives in
:mod:`prefixtune.peft.interop`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ..config import names

PREFIX_HELP = "folder of a saved prefix (a training run's --output-dir)"
PEFT_HELP = "folder of a PEFT prefix-tuning adapter"


def _command(summary: str, description: str, source: tuple[str, str, str], target: tuple[str, str, str],
             base_help: str, convert: str, written: str) -> SimpleNamespace:
    """A command that reads ``source`` and writes ``target`` (each ``(dest, METAVAR, help)``) with
    ``interop.<convert>(source, target, base_model=...)``, which writes ``interop.WRITTEN[convert]`` there."""
    def add_arguments(parser) -> None:
        for dest, metavar, help_text in (source, target):
            parser.add_argument(dest, metavar=metavar, help=help_text)
        parser.add_argument("--base-model", default=None, metavar="ID_OR_PATH", help=base_help)

    def run(args) -> int:
        from . import interop

        _refuse_to_overwrite(getattr(args, target[0]), target[1], interop.WRITTEN[convert])
        path = getattr(interop, convert)(getattr(args, source[0]), getattr(args, target[0]), base_model=args.base_model)
        print(f"{written} written to {path}")
        return 0

    return SimpleNamespace(SUMMARY=summary, DESCRIPTION=description, add_arguments=add_arguments, run=run)


def _refuse_to_overwrite(folder: str, metavar: str, files: tuple[str, ...]) -> None:
    """A conversion writes into a folder of its own: an empty name (the current folder) or a folder that
    already holds what it would write (a trained prefix, someone's adapter) is refused, so nothing is lost."""
    blank = names("a folder")(folder)
    if blank:
        raise ValueError(f"{metavar}: {blank}, got {folder!r}")
    there = [name for name in files if (Path(folder) / name).exists()]
    if there:
        raise ValueError(f"{metavar}: {folder} already holds {', '.join(there)}; remove it or choose another folder")


EXPORT = _command(
    "write a saved prefix as a PEFT prefix-tuning adapter",
    "Convert the prefix in OUT (prefix_config.json + prefix.safetensors) into PEFT_DIR (adapter_config.json + "
    "adapter_model.safetensors), which peft.PeftModel.from_pretrained(base, PEFT_DIR) loads with the same logits. "
    "Decoder-only models; a reparameterization MLP is exported folded (PEFT stores only the prefix's key/values). "
    "Prefixes PEFT cannot express (a subset of layers, shift_positions=False, encoder or cross-attention prefixes, "
    "a task head) are refused with the reason. See docs/peft.md.",
    ("prefix", "OUT", PREFIX_HELP), ("peft_dir", "PEFT_DIR", "folder to write the PEFT adapter to"),
    "base_model_name_or_path to record (default: the model the prefix was trained on)", "export_peft",
    "PEFT adapter")

IMPORT = _command(
    "turn a PEFT prefix-tuning adapter into a prefixtune prefix",
    "Convert the PEFT prefix-tuning adapter in PEFT_DIR (adapter_config.json + adapter_model.safetensors) into a "
    "prefix folder OUT that train/eval/generate and PrefixModel.from_pretrained read; the logits stay the same. "
    "The base model's config (--base-model, default the adapter's base_model_name_or_path) is read to check the "
    "shapes; its weights are not loaded. See docs/peft.md.",
    ("peft_dir", "PEFT_DIR", PEFT_HELP), ("prefix", "OUT", "folder to write the prefix to"),
    "Hub id or folder of the base model (default: the adapter's base_model_name_or_path)", "import_peft", "prefix")
