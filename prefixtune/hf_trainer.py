"""transformers' ``Trainer`` and TRL's ``SFTTrainer`` training a ``PrefixModel``: checkpoints hold the prefix.

A ``Trainer`` saves and reloads ``PreTrainedModel`` and PEFT models its own way and anything
else as one ``model.safetensors`` of the whole ``state_dict``: for a prefix, the frozen base
too (538 MB a checkpoint for the bundled 135M model), in a file ``PrefixModel.from_pretrained``
cannot read. One line after building the trainer changes that::

    trainer = Trainer(model=pm, args=args, train_dataset=...)   # or trl.SFTTrainer(...)
    prefixtune.hf_trainer.use_prefix_checkpoints(trainer)

Every checkpoint (``checkpoint-N/``) and ``trainer.save_model(dir)`` then holds the prefix as
``prefix_config.json`` + ``prefix.safetensors`` (with its MLP, so training continues), the task
head and the LoRA adapter where they train, and the trainer's own state files; never the base.
``resume_from_checkpoint`` and ``load_best_model_at_end`` read them back into the same
parameters, and ``PrefixModel.from_pretrained`` and ``prefixtune eval/generate/serve --prefix``
read a checkpoint folder as they read any prefix.

It also gives the trainer's optimizer the rates the prefixes ask for: with ``reparam_lr="width"``
(the default) the MLP's two weight matrices train at the trainer's rate divided by the MLP's width,
as ``prefixtune train`` trains them (``PrefixModel.parameter_groups``); a trainer left to itself
would train the whole MLP at one rate.

It works on the trainer instance, whatever its class (``Trainer``, ``SFTTrainer``, a subclass of
either): it overrides the three methods through which a ``Trainer`` writes and reads model
weights (``_save``, ``_load_from_checkpoint``, ``_load_best_model``) and the one that makes its
optimizer (``create_optimizer``; an optimizer handed to the trainer is left as it is).
"""

from __future__ import annotations

import os

import torch

from . import artifacts
from .model import PrefixModel
from .prefixes import ACTIVE

TRAINING_ARGS_NAME = "training_args.bin"
"""The trainer's own copy of its ``TrainingArguments``, written as every ``Trainer`` writes it."""


def use_prefix_checkpoints(trainer):
    """Make ``trainer`` (a ``transformers.Trainer`` or subclass, whose model is a ``PrefixModel``) save and
    load only what trains; returns it."""
    prefix_model(trainer.model)  # refuse anything else now, not at the first checkpoint
    if not isinstance(trainer, PrefixCheckpoints):
        trainer.__class__ = type(f"Prefix{type(trainer).__name__}", (PrefixCheckpoints, type(trainer)), {})
    return trainer


def prefix_model(model) -> PrefixModel:
    """The ``PrefixModel`` a trainer trains (it may have wrapped it, e.g. in DDP)."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, PrefixModel):
        raise TypeError(f"the trainer's model is a {type(inner).__name__}, not a PrefixModel: "
                        "use_prefix_checkpoints is for trainers of PrefixModel.wrap(...)")
    return inner


class PrefixCheckpoints:
    """The ``Trainer`` methods that write and read model weights, and make its optimizer, for a ``PrefixModel``."""

    def create_optimizer(self, *args, **kwargs):
        given = self.optimizer is not None
        optimizer = super().create_optimizer(*args, **kwargs)
        if not given:  # before the scheduler is made from it, and before any step
            scale_rates(optimizer, prefix_model(self.model).parameter_groups())
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        prefix_model(self.model).save_prefix(output_dir, keep_reparam=True)  # not the tokenizer: the base model's
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_into(prefix_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_into(prefix_model(self.model), self.state.best_model_checkpoint)


def load_into(pm: PrefixModel, directory) -> None:
    """Load the prefix saved in ``directory`` into ``pm``'s active prefix, in place: the optimizer
    keeps the parameters it holds (the task head and LoRA weights are loaded in place too)."""
    saved = artifacts.load_prefix(directory, pm.model, pm.shape, pm.heads)
    target = pm.prefixes[pm.prefixes.resolve(ACTIVE)]
    mine, theirs = target.state_dict(), saved.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise ValueError(f"{directory}: this prefix ({saved.config.prefix_length} positions, reparameterized: "
                         f"{saved.reparameterized}) is not the one being trained ({target.config.prefix_length}, "
                         f"{target.reparameterized})")
    with torch.no_grad():
        target.load_state_dict(theirs)


def scale_rates(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Split each of ``optimizer``'s parameter groups by the rate multipliers of ``groups``
    (``PrefixModel.parameter_groups``): a part at multiplier ``s`` keeps its group's settings (weight decay,
    betas) at ``s`` times its rate. Nothing changes where every multiplier is 1."""
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    if all(s == 1.0 for s in scale.values()):
        return
    split = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        by_scale: dict[float, list] = {}
        for param in group["params"]:
            by_scale.setdefault(scale.get(id(param), 1.0), []).append(param)
        split += [{**settings, "params": params, "lr": settings["lr"] * s} for s, params in by_scale.items()]
    optimizer.param_groups.clear()
    for group in split:
        optimizer.add_param_group(group)
