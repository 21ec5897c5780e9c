"""The training-step arms the benchmarks compare, each defined here once.

An arm is one way of running a training step (forward + backward) on a batch of token ids and
its padding mask, on a model of its own. The labels are the ids, the padding unscored (-100),
as ``prefixtune.data.collate`` makes them. Every benchmark that times, profiles, counts or
measures training steps (``train_step``, ``gpu``, ``memory``, ``scaling``, ``step_profile``,
``op_count``) builds its arms here, so the same name is the same computation everywhere.

* ``floor``: the frozen model's own forward + backward down to its input embeddings
  (``inputs_embeds`` requires grad, every weight is frozen, ``use_cache=False``). Any prefix
  method runs at least this much: the least a prefix-tuning step can cost.
* ``floor_cache``: the floor with transformers' default ``use_cache=True``, which fills a
  key/value cache that a training step never reads.
* ``prefixtune``: ``PrefixModel.wrap(model, PrefixConfig(10, reparameterize=True, 512))`` called as
  ``prefixtune train`` calls it (``prefixtune.train.language_model_loss``): the batch through
  ``causal_batch`` (a right-padded decoder-only batch loses its mask, which cannot change the
  loss) and the loss computed chunk by chunk without the ``[B, T, vocabulary]`` logits
  (``return_logits=False``, ``prefixtune/lm_loss.py``); the default attention policy.
* ``prefixtune_logits``: the same with the model's own loss over the full logits, as the floor
  and PEFT compute it.
* ``prefixtune_gc`` / ``prefixtune_gc_logits``: ``prefixtune`` / ``prefixtune_logits`` with
  gradient checkpointing (PEFT refuses it for prefix tuning).
* ``prefixtune_chunk28``: ``prefixtune`` with loss chunks of up to 2^28 logits
  (``prefixtune.lm_loss.CHUNK_ELEMENTS`` is 2^26): what the chunk size costs a large vocabulary.
* ``prefixtune_pad``, ``prefixtune_grouped``, ``prefixtune_mask``: ``prefixtune`` with one
  attention route forced where the policy allows it (:data:`POLICIES`), against the default
  ``auto`` that picks per call.
* ``prefixtune_keep_mask``: ``prefixtune`` with the padding mask kept (the masked kernels); it
  differs from ``prefixtune`` only on padded batches.
* ``prefixtune_memory``: ``prefixtune`` with a memory prefix (``PrefixConfig(kind="memory")``, a term
  on each head's output outside the softmax, :mod:`prefixtune.memory`) instead of the key/value one.
* ``peft``: ``peft.get_peft_model`` with ``PrefixTuningConfig(num_virtual_tokens=10,
  prefix_projection=True, encoder_hidden_size=512)``, its own forward and loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.attention import AttentionPolicy
from prefixtune.prefixes import ACTIVE
from prefixtune.train import language_model_loss

from .common import build_each, chunk_elements

PREFIX_LENGTH = 10
HIDDEN = 512
"""Every prefix arm's prefix length and MLP width, and PEFT's."""
BIG_CHUNK = 1 << 28
"""``prefixtune_chunk28``'s loss chunks (1 GiB of float32 logits)."""

POLICIES = {
    "auto": AttentionPolicy(),
    "pad": AttentionPolicy(pad_free_rows={"cpu": None}),
    "grouped": AttentionPolicy(pad_free_rows={"cpu": 10**9}),
    "mask": AttentionPolicy("mask"),
}
"""The attention policies the arms run: ``auto``, the library's default; ``pad``: the padded-query
route wherever it fits, on the CPU too; ``grouped``: never ``pad`` on the CPU, torch's SDPA with
grouped heads instead (on CUDA, which has no grouped route, this is ``auto``); ``mask``: always
the model's own kernel with an explicit widened mask (the reference)."""


@dataclasses.dataclass(frozen=True)
class Prefixed:
    """How a prefixtune arm departs from ``prefixtune``, the step ``prefixtune train`` runs."""

    logits: bool = False
    """The model's own loss over the full logits, not the chunked one."""
    checkpointing: bool = False
    policy: str = "auto"
    """A key of :data:`POLICIES`."""
    keep_mask: bool = False
    """The padding mask kept, not dropped by ``causal_batch``."""
    chunk: int | None = None
    """``prefixtune.lm_loss.CHUNK_ELEMENTS`` during the step."""
    kind: str = "kv"
    """The prefix's kind: ``kv`` (:func:`prefix_config`) or ``memory``."""


PREFIXED = {
    "prefixtune": Prefixed(),
    "prefixtune_logits": Prefixed(logits=True),
    "prefixtune_gc": Prefixed(checkpointing=True),
    "prefixtune_gc_logits": Prefixed(checkpointing=True, logits=True),
    "prefixtune_chunk28": Prefixed(chunk=BIG_CHUNK),
    "prefixtune_pad": Prefixed(policy="pad"),
    "prefixtune_grouped": Prefixed(policy="grouped"),
    "prefixtune_mask": Prefixed(policy="mask"),
    "prefixtune_keep_mask": Prefixed(keep_mask=True),
    "prefixtune_memory": Prefixed(kind="memory"),
}
NAMES = ("floor", "floor_cache", *PREFIXED, "peft")


def scored(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The labels: every token, but not the padding (-100), as training batches are (``data.collate``)."""
    return ids if mask is None else ids.masked_fill(mask == 0, -100)


def padding_mask(ids: torch.Tensor, padded: bool) -> torch.Tensor:
    """All ones; ``padded``: every other row right-padded after 3/4 of its length (mask 0 there),
    as batches of texts of different lengths are, so that every arm meets a masked batch."""
    mask = torch.ones_like(ids)
    if padded:
        mask[1::2, ids.shape[1] * 3 // 4:] = 0
    return mask


def prefix_config(prefix_length: int = PREFIX_LENGTH, **changes) -> PrefixConfig:
    """The prefix of every prefixtune arm: ``prefix_length`` positions through an MLP of width :data:`HIDDEN`."""
    return PrefixConfig(prefix_length=prefix_length, reparameterize=True, reparam_hidden_size=HIDDEN, **changes)


def peft_prefix_model(model: nn.Module, prefix_length: int = PREFIX_LENGTH):
    """PEFT's prefix tuning with the paper's MLP, configured like :func:`prefix_config`."""
    import peft

    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_length,
                                     prefix_projection=True, encoder_hidden_size=HIDDEN)
    return peft.get_peft_model(model, config)


# ---------------------------------------------------------------------------- the arms
class Arm:
    """One way of running a training step, on its own model (``module``: what holds its gradients)."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module

    def loss(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def step(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Forward + backward (gradients of the previous step cleared first); ``mask`` ``None``: no padding mask."""
        self.module.zero_grad(set_to_none=True)
        self.loss(ids, mask).backward()

    def routes(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[str] | None:
        """The attention routes a step on this batch takes (``None``: no prefix, the model's own kernel)."""
        return None


class Floor(Arm):
    """``floor`` and ``floor_cache``: the frozen model to its input embeddings."""

    def __init__(self, name: str, model: nn.Module, use_cache: bool = False):
        super().__init__(name, model.requires_grad_(False).train())
        self.embed, self.use_cache = model.get_input_embeddings(), use_cache

    def loss(self, ids, mask=None):
        inputs_embeds = self.embed(ids).detach().requires_grad_(True)
        return self.module(inputs_embeds=inputs_embeds, attention_mask=mask, labels=scored(ids, mask),
                           use_cache=self.use_cache).loss


class Prefixtune(Arm):
    """Every ``prefixtune*`` arm: a :class:`PrefixModel` run as :class:`Prefixed` says."""

    def __init__(self, name: str, model: nn.Module, how: Prefixed, config: PrefixConfig):
        wrapped = PrefixModel.wrap(model, config, attention=POLICIES[how.policy]).train()
        if how.checkpointing:
            wrapped.activation_checkpointing_enable()
        super().__init__(name, wrapped)
        self.how = how

    def loss(self, ids, mask=None, prefix=None):
        """The loss as ``prefixtune train`` computes it, with the active prefix unless ``prefix``
        (a name, one per row, or a ``PrefixBatch``, which records the routes taken)."""
        labels = scored(ids, mask)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if prefix is not None:
            batch["prefix"] = prefix
        items = (labels[:, 1:] != -100).sum().clamp_min(1)  # what train_step divides by: the labelled next tokens
        with chunk_elements(self.how.chunk):
            if self.how.keep_mask:
                return self.module(**batch, num_items_in_batch=items, return_logits=self.how.logits).loss
            return language_model_loss(self.module, self.module, batch, items, full_logits=self.how.logits)

    @torch.no_grad()
    def routes(self, ids, mask=None):
        """Found with one forward of two rows (padded ones among them if the batch has any)."""
        prefix = self.module.prefix_batch(ACTIVE, min(2, ids.shape[0]))
        self.loss(ids[:2], None if mask is None else mask[:2], prefix=prefix)
        return sorted(set(prefix.routes.values()))


class Peft(Arm):
    """``peft``: PEFT's prefix tuning, called as a transformers model is."""

    def __init__(self, name: str, model: nn.Module, prefix_length: int):
        super().__init__(name, peft_prefix_model(model, prefix_length).train())

    def loss(self, ids, mask=None):
        return self.module(input_ids=ids, attention_mask=mask, labels=scored(ids, mask)).loss


def build(name: str, model: nn.Module, prefix_length: int = PREFIX_LENGTH, policy: str | None = None,
          config: PrefixConfig | None = None) -> Arm:
    """Arm ``name`` (one of :data:`NAMES`) on ``model``, which it keeps and changes (give it a fresh one).

    ``policy`` overrides a prefixtune arm's attention policy (a key of :data:`POLICIES`);
    ``config`` replaces its prefix (default :func:`prefix_config` of ``prefix_length``).
    """
    if name in ("floor", "floor_cache"):
        return Floor(name, model, use_cache=name == "floor_cache")
    if name == "peft":
        return Peft(name, model, prefix_length)
    how = PREFIXED[name] if policy is None else dataclasses.replace(PREFIXED[name], policy=policy)
    default = PrefixConfig(kind="memory") if how.kind == "memory" else prefix_config(prefix_length)
    return Prefixtune(name, model, how, config or default)


def build_all(names, new_model: Callable[[], nn.Module], prefix_length: int = PREFIX_LENGTH) -> tuple[dict, dict]:
    """``({name: Arm}, {name: error line})`` for ``names``, each on its own ``new_model()``; an arm
    that fails to build (PEFT, say) is reported and the others still run."""
    return build_each({name: lambda name=name: build(name, new_model(), prefix_length) for name in names})
