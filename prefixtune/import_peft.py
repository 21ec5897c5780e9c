"""``prefixtune import-peft PEFT_DIR OUT``: a PEFT prefix-tuning adapter as a prefixtune prefix.

The command only; the conversion lives in :mod:`prefixtune.interop`.
"""

from __future__ import annotations

SUMMARY = "turn a PEFT prefix-tuning adapter into a prefixtune prefix"
DESCRIPTION = (
    "Convert the PEFT prefix-tuning adapter in PEFT_DIR (adapter_config.json + adapter_model.safetensors) into a "
    "prefix folder OUT that train/eval/generate and PrefixModel.from_pretrained read; the logits stay the same. "
    "The base model's config (--base-model, default the adapter's base_model_name_or_path) is read to check the "
    "shapes; its weights are not loaded. See docs/peft.md."
)


def add_arguments(parser) -> None:
    parser.add_argument("peft_dir", metavar="PEFT_DIR", help="folder of a PEFT prefix-tuning adapter")
    parser.add_argument("prefix", metavar="OUT", help="folder to write the prefix to")
    parser.add_argument("--base-model", default=None, metavar="ID_OR_PATH",
                        help="Hub id or folder of the base model (default: the adapter's base_model_name_or_path)")


def run(args) -> int:
    from .interop import import_peft

    target = import_peft(args.peft_dir, args.prefix, base_model=args.base_model)
    print(f"prefix written to {target}")
    return 0
