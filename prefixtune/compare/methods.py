"""The fine-tuning methods ``prefixtune compare`` puts side by side, as data.

Each method turns a freshly loaded base model into a :class:`Tuned`: the module whose
forward gives the loss, the one that generates, the parameters that train, and how its
checkpoint is written (in the method's own usual format: a prefixtune prefix folder, a
PEFT adapter folder, the adapter tensors, or the whole model).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..base_models import load_model
from ..config import MAX_LR
from ..options import split_list
from ..recipe import RATES
from ..train import language_model_loss
from .config import CompareConfig


@dataclass
class Tuned:
    """One base model prepared for one method."""

    model: nn.Module
    """What trains (put in training mode before the first step)."""
    loss: Callable
    """``loss(batch, items)``: the batch's summed loss over ``items`` tokens (``prefixtune.train.LossFn``)."""
    generator: object
    """Has ``eval()``, ``device`` and ``generate(..., prefix=...)`` (what ``evaluate.generate_texts`` needs)."""
    trainable: list[nn.Parameter]
    save: Callable[[Path], None]
    notes: list[str] = field(default_factory=list)
    groups: list[dict] | None = None
    """Optimizer parameter groups with an ``lr_scale`` each (``PrefixModel.parameter_groups``); ``None``:
    ``trainable`` at the method's rate."""


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    lr: float
    """Default peak learning rate (override with ``--lr name=value``)."""
    build: Callable[[nn.Module, object, CompareConfig], Tuned] | None
    """``None``: nothing trains (the untuned base model)."""
    describe: str
    needs: tuple[str, ...] = ()
    """Python packages the method imports."""
    load: Callable[[CompareConfig, torch.device], tuple] | None = None
    """Loads the base model itself (QLoRA: quantized); default ``base_models.load_model``."""
    unavailable: Callable[[CompareConfig, torch.device], str | None] = lambda cfg, device: None
    """Why the method cannot run here, or ``None``."""


class PrefixlessGenerator:
    """Any model as ``evaluate.generate_texts`` calls a PrefixModel: ``generate(..., prefix=...)``, the prefix ignored
    (the methods other than prefix tuning have none)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(p for p in self.model.parameters()).device

    def eval(self):
        self.model.eval()
        return self

    def generate(self, *args, prefix=None, **kwargs):
        return self.model.generate(*args, **kwargs)


# ------------------------------------------------------------------------------ builders
def _prefix(init: str, reparameterize: bool = True, kind: str = "kv", lora: bool = False,
            reparam_lr: str = "same") -> Callable:
    def build(model, tokenizer, cfg: CompareConfig) -> Tuned:
        from ..config import PrefixConfig
        from ..model import PrefixModel

        if lora:  # prefix + LoRA: the prefix wraps the PEFT model, and both train (docs/peft.md)
            import peft

            model = peft.get_peft_model(model, _lora_config(cfg))
        config = PrefixConfig(kind=kind, prefix_length=cfg.prefix_length, reparameterize=reparameterize,
                              reparam_hidden_size=cfg.reparam_hidden_size, reparam_lr=reparam_lr, init=init,
                              init_text=cfg.init_text if init == "text" else None)
        pm = PrefixModel.wrap(model, config, tokenizer=tokenizer)
        notes = [f"initialized from the activations of {cfg.init_text!r}"] if init == "text" else []
        return Tuned(pm, lambda batch, items: language_model_loss(pm, pm, batch, items), pm,  # as `prefixtune train`
                     pm.trainable_parameters(), lambda d: pm.save_prefix(d), notes, pm.parameter_groups())
    return build


def _transformers_loss(model: nn.Module) -> Callable:
    """The loss of a transformers (or PEFT) model as ``prefixtune.train.LossFn``: its own forward
    with ``num_items_in_batch``, which sums the token losses over that count."""
    return lambda batch, items: model(**batch, num_items_in_batch=items).loss


def _peft(make_config: Callable[[CompareConfig], object], notes: Callable[[CompareConfig], list[str]] = lambda c: []):
    def build(model, tokenizer, cfg: CompareConfig) -> Tuned:
        import peft

        tuned = peft.get_peft_model(model, make_config(cfg))
        trainable = [p for p in tuned.parameters() if p.requires_grad]
        return Tuned(tuned, _transformers_loss(tuned), PrefixlessGenerator(tuned), trainable, lambda d: tuned.save_pretrained(d),
                     notes(cfg))
    return build


def _peft_prefix_config(cfg):
    import peft

    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_length,
                                   prefix_projection=True, encoder_hidden_size=cfg.reparam_hidden_size)


PEFT_GENERATES_WITH_PREFIX = "0.22"
"""The first PEFT whose ``generate`` applies a prefix-tuning adapter under transformers 5: before it, PEFT handed
the prefix over as ``past_key_values`` and transformers' own cache won. ``tests/test_interop.py`` holds this to the
installed PEFT's behaviour."""


def peft_generates_with_prefix() -> bool:
    """Whether the installed PEFT's ``generate`` applies its prefix (:data:`PEFT_GENERATES_WITH_PREFIX`)."""
    import peft
    from packaging.version import Version

    return Version(peft.__version__) >= Version(PEFT_GENERATES_WITH_PREFIX)


def _peft_prefix_notes(cfg) -> list[str]:
    import peft
    import transformers

    if peft_generates_with_prefix():
        return []
    return [f"PEFT {peft.__version__} with transformers {transformers.__version__}: the training forward applies the "
            "prefix, but in generate transformers passes its own cache, which wins over PEFT's past_key_values "
            f"prefix, so the generations are the base model's (PEFT {PEFT_GENERATES_WITH_PREFIX} applies it); "
            "compare its training loss instead"]


def _prompt_config(cfg):
    import peft

    return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.prefix_length)


def _lora_config(cfg):
    import peft

    return peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                           target_modules=split_list(cfg.lora_targets))


def _qlora(model, tokenizer, cfg: CompareConfig) -> Tuned:
    import peft

    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tuned = peft.get_peft_model(model, _lora_config(cfg))
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    return Tuned(tuned, _transformers_loss(tuned), PrefixlessGenerator(tuned), trainable, lambda d: tuned.save_pretrained(d),
                 ["base weights in 4-bit NF4 (bitsandbytes), LoRA in fp32, bf16 compute"])


def _adapter(model, tokenizer, cfg: CompareConfig) -> Tuned:
    from safetensors.torch import save_file

    from .adapters import adapter_state, add_adapters

    trainable = add_adapters(model, cfg.adapter_size)

    def save(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(model), str(directory / "adapters.safetensors"))

    return Tuned(model, _transformers_loss(model), PrefixlessGenerator(model), trainable, save,
                 ["compare's own small Houlsby implementation (the adapters library needs transformers 4)"])


def _full(model, tokenizer, cfg: CompareConfig) -> Tuned:
    model.requires_grad_(True)
    trainable = [p for p in model.parameters()]
    return Tuned(model, _transformers_loss(model), PrefixlessGenerator(model), trainable, lambda d: model.save_pretrained(d))


# ------------------------------------------------------------------------ QLoRA loading
def _qlora_unavailable(cfg: CompareConfig, device: torch.device) -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'prefixtune[compare]'; 0.50 runs 4-bit on CPU too)"
    from transformers.integrations import validate_bnb_backend_availability

    if not validate_bnb_backend_availability(raise_exception=False):
        return f"bitsandbytes has no 4-bit backend for this {device.type} device"
    return None


def _qlora_load(cfg: CompareConfig, device: torch.device):
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    place = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return load_model(cfg.model, attn_implementation=cfg.attn_implementation, quantization_config=quant,
                      device_map=place)


# ----------------------------------------------------------------------------- the table
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("base", "base model (untuned)", 0.0, None, "the frozen model as it is: the floor"),
    # the rates of prefixtune train's rule (prefixtune.recipe): the MLP at one rate blew up at 3e-3 without
    # clipping (quick run: loss 3.5 -> 9.3 at step 3; docs/studies/e2e.md), and trained at 1e-3
    Method("prefix", "prefix tuning, the paper's MLP (prefixtune)", RATES["mlp-same"], _prefix("random"),
           "prefixtune's prefix through the paper's MLP (width --reparam-hidden-size), every parameter at the one "
           "rate, random init"),
    Method("prefix-flat", "prefix tuning, flat (prefixtune)", RATES["flat"], _prefix("random", reparameterize=False),
           "prefixtune's prefix trained directly, without the MLP (P-Tuning v2 style), random init"),
    Method("prefix-words", "prefix tuning, init from words (prefixtune)", 3e-3, _prefix("text"),
           "prefixtune's prefix initialized from the activations of --init-text (the paper's 'real words')"),
    Method("prefix-flat-words", "prefix tuning, flat, init from words (prefixtune)", 1e-2,
           _prefix("text", reparameterize=False),
           "prefixtune's prefix trained directly, starting from the activations of --init-text"),
    Method("prefix-memory", "memory prefix (prefixtune)", RATES["memory"],
           _prefix("random", reparameterize=False, kind="memory"),
           "prefixtune's memory prefix: a term on each head's output outside the softmax (PrefixMemory-Tuning), "
           "starting at zero"),
    Method("prefix-mup", "prefix tuning, train's default (prefixtune)", RATES["mlp-width"],
           _prefix("random", reparam_lr="width"),
           "prefixtune's MLP prefix with its weight matrices at the rate / --reparam-hidden-size (muP), random init: "
           "prefixtune train's default"),
    Method("prefix-lora", "flat prefix + LoRA (prefixtune)", 1e-2, _prefix("random", reparameterize=False, lora=True),
           "prefixtune's flat prefix trained beside LoRA (--lora-r, --lora-targets) on the same model",
           needs=("peft",)),
    Method("peft-prefix", "prefix tuning (PEFT)", 1e-3, _peft(_peft_prefix_config, _peft_prefix_notes),
           "PEFT PrefixTuningConfig with prefix_projection (the paper's MLP)", needs=("peft",)),
    Method("prompt", "prompt tuning (PEFT)", 1e-2, _peft(_prompt_config),
           "PEFT PromptTuningConfig: trainable input embeddings, random init", needs=("peft",)),
    Method("lora", "LoRA (PEFT)", 1e-2, _peft(_lora_config), "PEFT LoraConfig on --lora-targets", needs=("peft",)),
    Method("adapter", "bottleneck adapters (Houlsby, compare's own)", 1e-3, _adapter,
           "two bottleneck adapters per layer plus the layer norms (prefixtune.compare.adapters)"),
    Method("full", "full fine-tuning", 5e-5, _full, "every weight of the model trains"),
    Method("qlora", "QLoRA (PEFT + bitsandbytes)", 1e-2, _qlora, "LoRA over the model quantized to 4-bit NF4",
           needs=("peft",), load=_qlora_load, unavailable=_qlora_unavailable),
)}


def parse_methods(text: str) -> list[Method]:
    names = split_list(text)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not names:
        raise ValueError("--methods names no method")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method twice: {text}")
    return [METHODS[n] for n in names]


def learning_rates(text: str | None, methods: list[Method]) -> dict[str, float]:
    """``--lr``: one number for every method, or ``name=value`` pairs over the defaults."""
    rates = {m.name: m.lr for m in methods}
    if not text:
        return rates
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        return _checked({m.name: (0.0 if m.build is None else value) for m in methods}, methods)
    for part in split_list(text):
        name, sep, number = part.partition("=")
        if not sep or name.strip() not in METHODS:
            raise ValueError(f"--lr: expected NUMBER or METHOD=NUMBER pairs, got {part!r}")
        try:
            rates[name.strip()] = float(number)
        except ValueError:
            raise ValueError(f"--lr: {number!r} is not a number (in {part!r})") from None
    return _checked(rates, methods)


def _checked(rates: dict[str, float], methods: list[Method]) -> dict[str, float]:
    """``rates``, once each method that trains has one above 0 and at most ``MAX_LR`` (what ``train --lr``
    takes), so that a bad rate stops the comparison before any method runs instead of failing every row."""
    for method in methods:
        rate = rates[method.name]
        if method.build is not None and not 0 < rate <= MAX_LR:
            raise ValueError(f"--lr: {method.name}'s rate must be above 0 and at most {MAX_LR:g}, got {rate:g}")
    return rates


def listing() -> str:
    width = max(len(name) for name in METHODS) + 2
    lines = [f"{'method':{width}}{'default lr':>11}  description"]
    lines += [f"{m.name:{width}}{m.lr:>11.0e}  {m.describe}" for m in METHODS.values()]
    return "\n".join(lines)
