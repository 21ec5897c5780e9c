"""``prefixtune export-peft`` and ``prefixtune import-peft``: the commands; the conversion lives in
:mod:`prefixtune.peft.interop`."""

from __future__ import annotations

from types import SimpleNamespace


def _export_arguments(parser) -> None:
    parser.add_argument("prefix", metavar="OUT", help="folder of a saved prefix (a training run's --output-dir)")
    parser.add_argument("peft_dir", metavar="PEFT_DIR", help="folder to write the PEFT adapter to")
    parser.add_argument("--base-model", default=None, metavar="ID_OR_PATH",
                        help="base_model_name_or_path to record (default: the model the prefix was trained on)")


def _export(args) -> int:
    from .interop import export_peft

    print(f"PEFT adapter written to {export_peft(args.prefix, args.peft_dir, base_model=args.base_model)}")
    return 0


def _import_arguments(parser) -> None:
    parser.add_argument("peft_dir", metavar="PEFT_DIR", help="folder of a PEFT prefix-tuning adapter")
    parser.add_argument("prefix", metavar="OUT", help="folder to write the prefix to")
    parser.add_argument("--base-model", default=None, metavar="ID_OR_PATH",
                        help="Hub id or folder of the base model (default: the adapter's base_model_name_or_path)")


def _import(args) -> int:
    from .interop import import_peft

    print(f"prefix written to {import_peft(args.peft_dir, args.prefix, base_model=args.base_model)}")
    return 0


EXPORT = SimpleNamespace(
    SUMMARY="write a saved prefix as a PEFT prefix-tuning adapter",
    DESCRIPTION=(
        "Convert the prefix in OUT (prefix_config.json + prefix.safetensors) into PEFT_DIR (adapter_config.json + "
        "adapter_model.safetensors), which peft.PeftModel.from_pretrained(base, PEFT_DIR) loads with the same "
        "logits. Decoder-only models; a reparameterization MLP is exported folded (PEFT stores only the prefix's "
        "key/values). Prefixes PEFT cannot express (a subset of layers, shift_positions=False, encoder or "
        "cross-attention prefixes, a task head) are refused with the reason. See docs/peft.md."),
    add_arguments=_export_arguments, run=_export,
)

IMPORT = SimpleNamespace(
    SUMMARY="turn a PEFT prefix-tuning adapter into a prefixtune prefix",
    DESCRIPTION=(
        "Convert the PEFT prefix-tuning adapter in PEFT_DIR (adapter_config.json + adapter_model.safetensors) into "
        "a prefix folder OUT that train/eval/generate and PrefixModel.from_pretrained read; the logits stay the "
        "same. The base model's config (--base-model, default the adapter's base_model_name_or_path) is read to "
        "check the shapes; its weights are not loaded. See docs/peft.md."),
    add_arguments=_import_arguments, run=_import,
)
