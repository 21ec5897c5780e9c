"""PrefixModel: a frozen transformers model with any number of named prefixes.

A thin facade over the parts that each do one job: :mod:`.prefixes` (the named prefixes and
their per-batch layout), :mod:`.injection` and :mod:`.attention` (getting the prefix into
every attention call), :mod:`.cache` (the prefix in ``generate``'s key/value cache),
:mod:`.artifacts` (saving and loading, with task heads and LoRA) and :mod:`.lm_loss` (the
training loss without the full logits).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch
from torch import nn

from . import arch, artifacts, injection, lm_loss
from .attention import AttentionPolicy
from .cache import prefix_cache, text_tokens, tokens_key_values
from .config import PrefixConfig
from .encoder import PrefixEncoder, stack_sites
from .peft import lora
from .peft.wrappers import unwrap_adapters
from .prefixes import ACTIVE, PrefixArg, PrefixBatch, PrefixRegistry


class PrefixModel(nn.Module):
    """A frozen model plus named prefixes. Build it with :meth:`wrap` or :meth:`from_pretrained`.

    Args:
        model: A transformers model of a family listed in ``prefixtune.arch.FAMILIES`` (a causal
            LM, an encoder-decoder, or an encoder with a task head), or a PEFT LoRA model of one.
        tokenizer: Needed only for ``init="text"``.
        attention: How prefixed attention reaches its kernel: ``"auto"`` (measured per call) or
            ``"mask"`` (the model's own kernel, the reference), or an :class:`AttentionPolicy`.
    """

    def __init__(self, model: nn.Module, tokenizer=None, attention: str | AttentionPolicy = "auto"):
        super().__init__()
        self.family = arch.family_of(model)
        self.shape = arch.model_shape(model, self.family)
        self.model = model
        self.tokenizer = tokenizer
        self.attention = AttentionPolicy.of(attention)
        self.heads = arch.task_heads(model, self.family)  # trained and saved with the prefix
        self.adapter_params = lora.adapter_parameters(model)  # prefix + LoRA: PEFT's trainable weights
        self.prefixes = PrefixRegistry()
        self._base_attention = injection.install(model, self.family)  # freezes the model
        for param in self.trainable_parameters():  # the task head and PEFT's weights train again
            param.requires_grad_(True)

    @classmethod
    def wrap(cls, model: nn.Module, config: PrefixConfig | None = None, name: str = "default", tokenizer=None,
             attention: str | AttentionPolicy = "auto") -> "PrefixModel":
        """Freeze ``model`` and add one prefix called ``name`` (it becomes the active one)."""
        wrapped = cls(model, tokenizer=tokenizer, attention=attention)
        wrapped.add_prefix(name, config or PrefixConfig())
        return wrapped

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, name: str = "default", tokenizer=None,
                        attention: str | AttentionPolicy = "auto") -> "PrefixModel":
        """Wrap ``model`` and load the prefix saved in ``directory`` as ``name``. A prefix trained with
        LoRA brings its adapter (``directory/adapter``): ``model`` is wrapped in it first, for inference."""
        wrapped = cls(lora.with_saved_adapter(model, directory), tokenizer=tokenizer, attention=attention)
        wrapped.load_prefix(directory, name=name)
        return wrapped

    def unwrap(self) -> nn.Module:
        """Give the base model back as it was (its attention kernel restored, untagged)."""
        injection.uninstall(self.model, self.family, self._base_attention)
        return self.model

    def __getattr__(self, name: str):
        """What the wrapper lacks comes from the base model (``config``, ``generation_config``,
        ``add_model_tags``...), as PEFT's wrappers do: trainers that expect a transformers model take it."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules, ``model`` among them
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def device(self) -> torch.device:
        weight = self.model.get_input_embeddings().weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    @property
    def decoder_only(self) -> bool:
        """Whether the model is a decoder alone (every attention causal self-attention)."""
        return set(self.shape.groups) == {"decoder"}

    # ------------------------------------------------------------------ prefixes
    def add_prefix(self, name: str, config: PrefixConfig | None = None) -> None:
        """Add a new trainable prefix ``name`` (initialized as ``config.init`` says)."""
        config = config or PrefixConfig()
        sites = arch.resolve_sites(config.layers, config.targets, self.shape)
        encoder = artifacts.new_prefix(config, sites, self.shape).to(self.device)
        if config.init == "text":
            ids = text_tokens(self.tokenizer, config.init_text, config.prefix_length)
            encoder.init_fit_error = encoder.fit(stack_sites(self.key_values_for_tokens(ids), sites))
        self.prefixes.add(name, encoder)

    def remove_prefix(self, name: str) -> None:
        """Forget prefix ``name``."""
        self.prefixes.remove(name)

    def set_active(self, name: str) -> None:
        """Make ``name`` the prefix used when a call gives no ``prefix=``."""
        self.prefixes.set_active(name)

    active = property(lambda self: self.prefixes.active, doc="The prefix used when a call gives no ``prefix=``.")

    def trainable_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """What trains: prefix ``name`` (or every prefix), the task head when the model has one
        (``arch.Family.heads``), and on a PEFT LoRA model the weights PEFT marked trainable. What
        :meth:`save_prefix` writes is the same list."""
        modules = [self.prefixes[self.prefixes.known(name)]] if name else list(self.prefixes.values())
        return [p for module in [*modules, *self.heads.values()] for p in module.parameters()] + self.adapter_params

    def parameter_groups(self) -> list[dict]:
        """What trains (:meth:`trainable_parameters`), as optimizer parameter groups: ``{"params", "lr_scale"}``,
        the rate multiplier each prefix asks for (``PrefixConfig.reparam_lr``); task heads and LoRA at 1."""
        groups = [{"params": params, "lr_scale": scale} for prefix in self.prefixes.values()
                  for params, scale in prefix.rate_groups() if params]
        rest = [p for module in self.heads.values() for p in module.parameters()] + self.adapter_params
        return groups + ([{"params": rest, "lr_scale": 1.0}] if rest else [])

    def state_dict(self, *args, **kwargs):
        """The module's state dict; for a transformers ``Trainer`` writing a checkpoint, what trains only.

        A ``Trainer`` not set up with ``prefixtune.hf_trainer.use_prefix_checkpoints`` saves any model that is
        not a ``PreTrainedModel`` as its whole ``state_dict()``: the frozen base in every checkpoint (538 MB
        for the bundled model). Asked from there, this gives the trainable tensors alone, which that
        trainer's resume and best-model loading read back (they load non-strictly), and says once which
        line makes its checkpoints prefix folders that the rest of prefixtune reads."""
        full = super().state_dict(*args, **kwargs)
        if args or kwargs or not _asked_by_trainer_save():
            return full
        if not getattr(self, "_told_of_trainer", False):
            self._told_of_trainer = True
            logging.getLogger("prefixtune").warning(
                "prefixtune: this Trainer saves the PrefixModel's trainable tensors only (not the frozen base); "
                "call prefixtune.hf_trainer.use_prefix_checkpoints(trainer) to save prefix folders that "
                "PrefixModel.from_pretrained and prefixtune eval/generate/serve read, and to train the prefix's "
                "MLP at the rates prefixtune train gives it")
        trains = {id(p) for p in self.trainable_parameters()}
        names = {name for name, p in self.named_parameters() if id(p) in trains}
        return type(full)((k, v) for k, v in full.items() if k in names)

    def prefix_key_values(self, name: str = ACTIVE) -> tuple:
        """Per model site, ``(k, v)`` each ``[kv_heads, L_p, head_dim]``; ``None`` for sites without it."""
        prefix = self.prefixes[self.prefixes.resolve(name)]
        if prefix.kind != "kv":
            raise ValueError(f"prefix {self.prefixes.resolve(name)!r} is a {prefix.kind} prefix: it has no key/values "
                             "(its memory is prefixes[name].raw_memory())")
        return prefix.site_key_values(self.shape.num_layers)

    def set_prefix_key_values(self, key_values: Sequence, name: str = "default") -> None:
        """Install fixed key/values (layout of :meth:`prefix_key_values`) as a flat prefix ``name``."""
        if len(key_values) != self.shape.num_layers:
            raise ValueError(f"got key/values for {len(key_values)} layers, the model has {self.shape.num_layers}")
        base = self.prefixes[name].config if name in self.prefixes else PrefixConfig()
        self.prefixes.add(name, PrefixEncoder.fixed(key_values, base).to(self.device), replace_existing=True)

    def key_values_for_tokens(self, input_ids: torch.Tensor) -> tuple:
        """The frozen model's own per-site ``(k, v)`` for tokens ``input_ids`` (``[L]``), each
        ``[kv_heads, L, head_dim]``: the prefix that makes the model act as if it had read them."""
        return tokens_key_values(self.model, input_ids.to(self.device), self.shape.num_layers, self.decoder_only)

    @torch.no_grad()
    def materialize(self, name: str | None = None) -> None:
        """Fold the reparameterization MLP of ``name`` (or of every prefix) into fixed key/values."""
        for key in [self.prefixes.known(name)] if name else list(self.prefixes):
            self.prefixes[key].materialize()

    def prefix_batch(self, prefix: PrefixArg, rows: int) -> PrefixBatch | None:
        """Lay out ``prefix`` (one name, or one name / ``None`` per row) for a batch of ``rows``, with
        this model's attention policy; a :class:`PrefixBatch` is used as it is."""
        batch = self.prefixes.batch(prefix, rows, self.shape.num_layers, self.device)
        if batch is not None:
            batch.policy = batch.policy or self.attention
            batch.routes.clear()
        return batch

    # ------------------------------------------------------------------ calls
    def forward(self, input_ids=None, attention_mask=None, labels=None, prefix: PrefixArg = ACTIVE,
                return_logits: bool = True, **kwargs):
        """The base model's forward with the prefix; returns the usual output (``.loss``, ``.logits``).
        ``return_logits=False`` with ``labels`` asks for the loss only, computed where it can be without the
        ``[B, T, vocabulary]`` logits (:mod:`prefixtune.lm_loss`), as training does. In training mode
        ``use_cache`` defaults to ``False``: a cache that no one reads would copy every layer's keys and values."""
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if self.training:
            kwargs.setdefault("use_cache", False)
        # the loss without the full logits: a decoder-only LM without a task head (prefixtune.lm_loss)
        chunked = not return_logits and labels is not None and not self.heads and self.decoder_only
        head = lm_loss.head_of(self.model) if chunked else None
        if head is None:
            return self._with_prefix(self.model, prefix, kwargs)
        return lm_loss.loss_only(lambda **body_kwargs: self.base_model(prefix=prefix, **body_kwargs), head, kwargs)

    @property
    def base_model(self):
        """The transformer under the LM head, called with the prefix (``prefix=`` as in :meth:`forward`):
        the chunked loss, and TRL's fused LM head, run it and project the hidden states themselves."""
        return lambda prefix=ACTIVE, **kwargs: self._with_prefix(lm_loss.body_of(self.model), prefix, kwargs)

    def _with_prefix(self, module: nn.Module, prefix: PrefixArg, kwargs: dict):
        """``module(**kwargs)`` with ``prefix`` in every attention call, refusing outputs it never reached."""
        batch = self.prefix_batch(prefix, injection.rows(kwargs))
        out = module(**(kwargs if batch is None else injection.call_kwargs(batch, kwargs, self.family, self.device)))
        injection.check_applied(batch)
        return out

    def generate(self, *args, prefix: PrefixArg = ACTIVE, **kwargs):
        """``model.generate`` with the prefix, for every decoding strategy transformers offers. The prefix is
        computed once per call and handed to every step by a forward pre-hook (beam search's rows mirrored);
        on a decoder-only model it sits at the front of the key/value cache (:mod:`prefixtune.cache`)."""
        with torch.no_grad():
            batch = self.prefix_batch(prefix, args[0].shape[0] if args else injection.rows(kwargs))
        if batch is None:
            return self.model.generate(*args, **kwargs)
        batch = batch.cast(self.model.dtype)  # no gradients here: convert once, not per layer and token
        cache = prefix_cache(unwrap_adapters(self.model), batch, kwargs) if self.decoder_only else None
        if cache is not None:
            kwargs["cache"] = cache
            batch.in_cache = batch.kv_layers
        with injection.generation_hooks(self.model, self.family, batch, self.device):
            out = self.model.generate(*args, **kwargs)
        injection.check_applied(batch)
        return out

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the frozen layers in backward to save memory (``Trainer(gradient_checkpointing=True)``
        calls this); always non-reentrant (:func:`prefixtune.injection.checkpointing`)."""
        injection.checkpointing(self.model, activation_checkpointing_kwargs, every_n_layers, offload)

    gradient_checkpointing_enable = activation_checkpointing_enable

    # ------------------------------------------------------------------ artifacts
    def save_prefix(self, directory, name: str = ACTIVE, keep_reparam: bool = False):
        """Write prefix ``name`` as ``prefix_config.json`` + ``prefix.safetensors`` (with the task head
        and the LoRA adapter, where they train). The key/values are always stored, folded, ready for
        inference; ``keep_reparam=True`` stores the MLP and embedding too, so training can resume."""
        encoder = self.prefixes[self.prefixes.resolve(name)]
        return artifacts.save_prefix(directory, encoder, self.model, self.shape, self.heads, keep_reparam)

    def load_prefix(self, directory, name: str = "default") -> None:
        """Load a prefix saved by :meth:`save_prefix` as ``name`` (replacing one of that name)."""
        encoder = artifacts.load_prefix(directory, self.model, self.shape, self.heads)
        self.prefixes.add(name, encoder.to(self.device), replace_existing=True)


def _asked_by_trainer_save(depth: int = 4) -> bool:
    """Whether the caller a few frames up is ``transformers.Trainer._save`` (it asks for ``state_dict()``)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "_save" and code.co_filename.replace("\\", "/").endswith("transformers/trainer.py"):
            return True
        frame = frame.f_back
    return False
