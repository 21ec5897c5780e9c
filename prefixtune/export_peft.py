"""``prefixtune export-peft OUT PEFT_DIR``: a saved prefix as a PEFT prefix-tuning adapter.

The command only; the conversion lives in :mod:`prefixtune.interop`.
"""

from __future__ import annotations

SUMMARY = "write a saved prefix as a PEFT prefix-tuning adapter"
DESCRIPTION = (
    "Convert the prefix in OUT (prefix_config.json + prefix.safetensors) into PEFT_DIR (adapter_config.json + "
    "adapter_model.safetensors), which peft.PeftModel.from_pretrained(base, PEFT_DIR) loads with the same logits. "
    "Decoder-only models; a reparameterization MLP is exported folded (PEFT stores only the prefix's key/values). "
    "Prefixes PEFT cannot express (a subset of layers, shift_positions=False, encoder or cross-attention prefixes, "
    "a task head) are refused with the reason. See docs/peft.md."
)


def add_arguments(parser) -> None:
    parser.add_argument("prefix", metavar="OUT", help="folder of a saved prefix (a training run's --output-dir)")
    parser.add_argument("peft_dir", metavar="PEFT_DIR", help="folder to write the PEFT adapter to")
    parser.add_argument("--base-model", default=None, metavar="ID_OR_PATH",
                        help="base_model_name_or_path to record (default: the model the prefix was trained on)")


def run(args) -> int:
    from .interop import export_peft

    target = export_peft(args.prefix, args.peft_dir, base_model=args.base_model)
    print(f"PEFT adapter written to {target}")
    return 0
