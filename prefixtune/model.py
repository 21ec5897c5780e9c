"""PrefixModel: a frozen transformers model with any number of named prefixes.

The wrapper never copies or edits the model's code. It freezes the weights, points the
model's attention at the prefix-aware kernel of :mod:`prefixtune.attention`, tags each
self-attention module with its layer index, and then, per call, turns ``prefix=`` (one
name, or one name or ``None`` per row) into a :class:`PrefixBatch` passed down as a
keyword argument. ``generate`` does the same through a forward pre-hook, because
``generate()`` refuses keyword arguments that the model's ``forward`` does not name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import arch, lm_loss, lora  # lora: PEFT adapters (LoRA) trained beside the prefix, issue 6
from .artifacts import read_prefix, write_prefix
from .attention import CAUSAL_ATTR, KWARG, LAYER_ATTR, PrefixBatch, implementation_name
from .cache import prefix_cache
from .config import PrefixConfig
from .encoder import PrefixEncoder
from .models import class_names

ACTIVE = "__active__"
"""Default of ``prefix=``: the active prefix (the first one added, or ``set_active``)."""

PrefixArg = str | None | Sequence[str | None] | PrefixBatch


class PrefixModel(nn.Module):
    """A frozen causal LM plus named prefixes. Build it with :meth:`wrap` or :meth:`from_pretrained`."""

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        self.layout = arch.layout_for(model)
        self.shape = arch.model_shape(model, self.layout)
        self.model = model
        self.heads = arch.task_heads(model, self.layout)  # trained and saved with the prefix
        # prefix + LoRA (issue 6): the weights PEFT marked trainable keep training and are saved with the prefix
        lora.check_wrappable(model)
        self.adapter_params = lora.trainable_adapter_parameters(model)
        self.tokenizer = tokenizer
        self.prefixes = nn.ModuleDict()
        self.active: str | None = None
        # the kernel to restore on unwrap (a model wrapped before keeps its original kernel's name)
        self._base_attention = model.config._attn_implementation.removeprefix("prefixtune_")
        self._install()

    # ------------------------------------------------------------------ building
    @classmethod
    def wrap(cls, model: nn.Module, config: PrefixConfig | None = None, name: str = "default", tokenizer=None):
        """Freeze ``model`` and add one prefix called ``name``.

        Args:
            model: A transformers causal LM of a family listed in ``prefixtune.arch.LAYOUTS``.
            config: The prefix's configuration (defaults to ``PrefixConfig()``).
            name: Name of this first prefix; it becomes the active one.
            tokenizer: Needed only for ``init="text"``.
        """
        wrapped = cls(model, tokenizer=tokenizer)
        wrapped.add_prefix(name, config or PrefixConfig())
        return wrapped

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, name: str = "default", tokenizer=None):
        """Wrap ``model`` and load the prefix saved in ``directory`` under ``name``.

        A prefix trained together with LoRA (``directory/adapter``, see :mod:`prefixtune.lora`)
        brings its adapter: ``model`` is wrapped in it first (frozen; for inference).
        """
        if lora.has_saved_adapter(directory) and not arch.is_peft_model(model):  # prefix + LoRA, issue 6
            model = lora.attach_saved_adapter(model, directory)
        wrapped = cls(model, tokenizer=tokenizer)
        wrapped.load_prefix(directory, name=name)
        return wrapped

    def _install(self) -> None:
        self.model.requires_grad_(False)
        name = implementation_name(self._base_attention)
        self.model.set_attn_implementation(name)
        if self.model.config._attn_implementation != name:
            raise NotImplementedError(
                f"{type(self.model).__name__} would not switch its attention to {name!r}: it does not "
                "call attention through transformers' AttentionInterface"
            )
        for head in self.heads.values():
            head.requires_grad_(True)
        for param in self.adapter_params:  # prefix + LoRA: PEFT's trainable weights (prefixtune.lora)
            param.requires_grad_(True)
        for site, (group, module) in enumerate(arch.attention_modules(self.model, self.layout)):
            setattr(module, LAYER_ATTR, site)
            setattr(module, CAUSAL_ATTR, group.causal)

    def unwrap(self) -> nn.Module:
        """Give the base model back exactly as it was (attention kernel restored, untagged)."""
        self.model.set_attn_implementation(self._base_attention)
        for _, module in arch.attention_modules(self.model, self.layout):
            for attr in (LAYER_ATTR, CAUSAL_ATTR):
                if hasattr(module, attr):
                    delattr(module, attr)
        return self.model

    @property
    def config(self):
        """The base model's config."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        weight = self.model.get_input_embeddings().weight
        return weight.device if weight.device.type != "meta" else torch.device("cpu")

    def add_prefix(self, name: str, config: PrefixConfig | None = None) -> None:
        """Add a new trainable prefix ``name`` (initialized as ``config.init`` says)."""
        config = config or PrefixConfig()
        if not name or name == ACTIVE or name in self.prefixes:
            raise ValueError(f"prefix name {name!r} is empty, reserved or already used")
        layers = arch.resolve_sites(config.layers, config.targets, self.shape)
        encoder = PrefixEncoder(config, layers, self.shape.num_kv_heads, self.shape.head_dim).to(self.device)
        if config.init == "text":
            self._init_from_text(encoder, config.init_text)
        self._register(name, encoder)

    def remove_prefix(self, name: str) -> None:
        """Forget prefix ``name``."""
        del self.prefixes[self._known(name)]
        if self.active == name:
            self.active = next(iter(self.prefixes), None)

    def set_active(self, name: str) -> None:
        """Make ``name`` the prefix used when a call gives no ``prefix=``."""
        self.active = self._known(name)

    def _register(self, name: str, encoder: PrefixEncoder) -> None:
        self.prefixes[name] = encoder
        if self.active is None:
            self.active = name

    def _known(self, name: str) -> str:
        if name not in self.prefixes:
            raise KeyError(f"no prefix named {name!r}; this model has: {', '.join(self.prefixes) or 'none'}")
        return name

    # ------------------------------------------------------------ key/values
    def trainable_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """The parameters that train: those of prefix ``name`` (or of all prefixes), and the
        task head when the model has one (see ``arch.Layout.heads``), and on a PEFT LoRA model
        the weights PEFT marked trainable (``adapter_params``, prefix + LoRA). Nothing else."""
        modules = [self.prefixes[self._known(name)]] if name else list(self.prefixes.values())
        params = [p for module in [*modules, *self.heads.values()] for p in module.parameters()]
        return params + self.adapter_params  # prefix + LoRA: PEFT's trainable weights too (issue 6)

    def prefix_key_values(self, name: str = ACTIVE) -> tuple:
        """Per model layer, ``(k, v)`` each ``[kv_heads, L_p, head_dim]``; ``None`` for layers without it."""
        encoder = self.prefixes[self._resolve(name)]
        key_values = encoder.raw_key_values()
        slot = {layer: i for i, layer in enumerate(encoder.layers)}
        return tuple(
            (key_values[slot[i], 0], key_values[slot[i], 1]) if i in slot else None
            for i in range(self.shape.num_layers)
        )

    def set_prefix_key_values(self, key_values: Sequence, name: str = "default") -> None:
        """Install fixed key/values (layout of ``prefix_key_values``) as a flat prefix ``name``."""
        if len(key_values) != self.shape.num_layers:
            raise ValueError(f"got key/values for {len(key_values)} layers, the model has {self.shape.num_layers}")
        layers = tuple(i for i, kv in enumerate(key_values) if kv is not None)
        if not layers:
            raise ValueError("key/values are None for every layer")
        target = _stack_layers(key_values, layers)
        old = self.prefixes[name].config if name in self.prefixes else PrefixConfig()
        config = old.replace(prefix_length=target.shape[3], reparameterize=False, layers=layers, init="random")
        encoder = PrefixEncoder(config, layers, self.shape.num_kv_heads, self.shape.head_dim)
        encoder.fit(target)
        if name in self.prefixes:
            del self.prefixes[name]
        self._register(name, encoder.to(self.device))

    @torch.no_grad()
    def key_values_for_tokens(self, input_ids: torch.Tensor) -> tuple:
        """The frozen model's own per-layer ``(k, v)`` for tokens ``input_ids`` (``[L]``), each
        ``[kv_heads, L, head_dim]``: the prefix that makes the model act as if it had read them."""
        if not self.decoder_only:
            raise NotImplementedError(
                "key/values from tokens (init='text') need a decoder-only model: in an encoder the "
                "activations of a text depend on the text that follows it"
            )
        with _eval_mode(self.model):
            out = self.model(input_ids=input_ids.view(1, -1).to(self.device), use_cache=True)
        cache = out.cache
        return tuple((layer.keys[0], layer.values[0]) for layer in cache.layers[: self.shape.num_layers])

    def _init_from_text(self, encoder: PrefixEncoder, text: str) -> None:
        if self.tokenizer is None:
            raise ValueError("init='text' needs a tokenizer: PrefixModel.wrap(model, config, tokenizer=tokenizer)")
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() == 0:
            raise ValueError(f"init_text {text!r} has no tokens")
        length = encoder.config.prefix_length
        ids = ids.repeat(-(-length // ids.numel()))[:length]
        key_values = self.key_values_for_tokens(ids)
        target = _stack_layers(key_values, encoder.layers)
        encoder.init_fit_error = encoder.fit(target.to(self.device))

    @torch.no_grad()
    def materialize(self, name: str | None = None) -> None:
        """Fold the reparameterization MLP of ``name`` (or of every prefix) into fixed key/values."""
        for key in [self._known(name)] if name else list(self.prefixes):
            self.prefixes[key].materialize()

    # ------------------------------------------------------------- per call
    def prefix_batch(self, prefix: PrefixArg, rows: int) -> PrefixBatch | None:
        """Lay out ``prefix`` (one name, or one name / ``None`` per row) for a batch of ``rows``;
        a :class:`PrefixBatch` (one laid out already, e.g. by ``prefixtune.serve``) is used as it is."""
        if isinstance(prefix, PrefixBatch):
            return prefix
        names = self._row_names(prefix, rows)
        unique = list(dict.fromkeys(n for n in names if n is not None))
        if not unique:
            return None
        encoders = [self.prefixes[n] for n in unique]
        made = [encoder() for encoder in encoders]  # each [n_layers, 2, kv_heads, L_p, head_dim]
        if len(unique) == 1 and None not in names:  # one prefix for every row: what training sends
            shift = _shift(encoders[0])
            return PrefixBatch(key_values=_uniform_key_values(encoders[0], made[0], rows, self.shape.num_layers),
                               valid=[None] * self.shape.num_layers, shift=shift,
                               offsets=torch.full((rows,), shift, device=self.device))
        return self._mixed_batch(encoders, made, [unique.index(n) if n is not None else len(unique) for n in names])

    def _mixed_batch(self, encoders: list[PrefixEncoder], made: list[torch.Tensor], index: list[int]) -> PrefixBatch:
        """Rows with different prefixes (or none: ``index`` = ``len(encoders)``), each layer's
        prefixes zero-padded to the longest, with per-row validity where they differ."""
        width = max(kv.shape[3] for kv in made)
        row_index = torch.tensor(index, device=self.device)
        lengths = torch.tensor([e.config.prefix_length for e in encoders] + [0], device=self.device)
        shifts = [_shift(e) for e in encoders] + [0]
        row_shifts = {shifts[i] for i in index}
        batch = PrefixBatch(key_values=[], valid=[], offsets=torch.tensor(shifts, device=self.device)[row_index],
                            shift=row_shifts.pop() if len(row_shifts) == 1 else None)
        for layer in range(self.shape.num_layers):
            per_prefix = [_layer_slice(e, kv, layer) for e, kv in zip(encoders, made)]  # [2, kvh, L, hd] | None
            if all(p is None for p in per_prefix):
                batch.key_values.append(None)
                batch.valid.append(None)
                continue
            stacked, valid = _stack_padded(per_prefix, lengths[:-1], width)
            # index_select, not stacked[row_index]: advanced indexing was ~2000x slower per layer on CPU
            gathered = stacked.index_select(0, row_index)  # [B, 2, kv_heads, width, head_dim]
            batch.key_values.append((gathered[:, 0], gathered[:, 1]))
            # every row's every slot real (all rows prefixed, equal lengths, this layer in each):
            # no mask to build, so attention keeps its mask-free path
            full = len(encoders) not in index and all(p is not None and p.shape[2] == width for p in per_prefix)
            batch.valid.append(None if full else valid.index_select(0, row_index))
        return batch

    def _row_names(self, prefix: PrefixArg, rows: int) -> list[str | None]:
        if prefix is None or isinstance(prefix, str):
            return [self._resolve(prefix)] * rows if prefix is not None else [None] * rows
        names = list(prefix)
        if len(names) != rows:
            raise ValueError(f"prefix= lists {len(names)} names for a batch of {rows} rows")
        return [None if n is None else self._resolve(n) for n in names]

    def _resolve(self, name: str) -> str:
        if name == ACTIVE:
            if self.active is None:
                raise ValueError("this PrefixModel has no prefix yet; add one with add_prefix()")
            return self.active
        return self._known(name)

    def _inject(self, batch: PrefixBatch, kwargs: dict) -> dict:
        """``kwargs`` of a base-model call, plus the prefix and the shifted positions."""
        batch = batch.expand_rows(_rows(kwargs))
        if self.layout.positions == "internal":  # the model numbers positions itself; nothing to shift
            return {**kwargs, KWARG: batch}
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = self._base_positions(tokens.shape[1], kwargs)
        shift = batch.shift if batch.shift is not None else batch.offsets[:, None].to(positions.device)
        return {**kwargs, KWARG: batch, "position_ids": positions + shift}

    def _base_positions(self, length: int, kwargs: dict) -> torch.Tensor:
        """The positions the base model would give these tokens itself (see ``arch.Layout.positions``)."""
        mask = kwargs.get("attention_mask")
        if self.layout.positions == "mask" and mask is not None and mask.dim() == 2:
            mask = mask.long()
            return (mask.cumsum(-1) * mask - 1)[:, -length:]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        return torch.arange(past, past + length, device=self.device)[None]

    @staticmethod
    def _check_applied(batch: PrefixBatch | None) -> None:
        """Refuse to return outputs computed without the prefix (PEFT's silent failure)."""
        if batch is None:
            return
        missing = sorted(batch.prefixed_layers - batch.used)
        batch.used.clear()
        if missing:
            raise RuntimeError(
                f"the prefix never reached the attention of layers {missing}: the model's attention "
                "implementation was changed after wrapping, or this model does not call attention "
                "through transformers' AttentionInterface"
            )

    def forward(self, input_ids=None, attention_mask=None, labels=None, prefix: PrefixArg = ACTIVE,
                return_logits: bool = True, **kwargs):
        """The base model's forward with the prefix; returns the usual output (``.loss``, ``.logits``).

        ``return_logits=False`` with ``labels`` asks for the loss only: where
        :func:`prefixtune.lm_loss.head_of` allows, it is then computed chunk by chunk without
        the ``[B, T, vocabulary]`` logits (``.logits`` is ``None``), which is what training does.
        In training mode ``use_cache`` defaults to ``False``: transformers would otherwise copy
        every layer's keys and values into a cache that no one reads.
        """
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if self.training:
            kwargs.setdefault("use_cache", False)
        batch = self.prefix_batch(prefix, _rows(kwargs))
        if batch is not None:
            kwargs = self._inject(batch, kwargs)
        head = None if return_logits or labels is None else self._causal_lm_head()
        out = self.model(**kwargs) if head is None else self._loss_only(head, kwargs)
        self._check_applied(batch)
        return out

    def _causal_lm_head(self) -> nn.Linear | None:
        """The LM head, where the chunked loss applies: a decoder-only causal LM, no task head."""
        return None if self.heads or not self.decoder_only else lm_loss.head_of(self.model)

    @property
    def decoder_only(self) -> bool:
        """Whether the model is a decoder alone (every attention causal self-attention)."""
        return set(self.shape.groups) == {"decoder"}

    def _loss_only(self, head: nn.Linear, kwargs: dict) -> CausalLMOutputWithPast:
        """The body's hidden states, then the chunked loss (:mod:`prefixtune.lm_loss`)."""
        labels, items = kwargs.pop("labels"), kwargs.pop("num_items_in_batch", None)
        hidden = lm_loss.body_of(self.model)(**{**kwargs, "use_cache": False}).last_hidden_state
        return CausalLMOutputWithPast(loss=lm_loss.causal_lm_loss(hidden, head, labels, items))

    def generate(self, *args, prefix: PrefixArg = ACTIVE, **kwargs):
        """``model.generate`` with the prefix, for every decoding strategy transformers offers.

        The prefix key/values are computed once per call and handed to each decoding step
        by a forward pre-hook; beam search's row expansion is mirrored row by row.
        """
        rows = args[0].shape[0] if args else _rows(kwargs)
        with torch.no_grad():
            batch = self.prefix_batch(prefix, rows)
        if batch is None:
            return self.model.generate(*args, **kwargs)
        batch = batch.cast(self.model.dtype)  # no gradients here: convert once, not per layer and token
        cache = prefix_cache(arch.unwrap_adapters(self.model), batch, kwargs) if self.decoder_only else None
        if cache is not None:  # the prefix sits in the cache once instead of being copied at every step
            kwargs["cache"] = cache
            batch = dataclasses.replace(batch, in_cache=batch.prefixed_layers)

        def hook(module, hook_args, hook_kwargs):
            return hook_args, self._inject(batch, hook_kwargs)

        # an encoder-decoder's generate() runs the encoder once, directly, not through forward()
        # arch.unwrap_adapters: PEFT's generate() calls the inner transformers model, not its own forward
        inner = arch.unwrap_adapters(self.model)
        modules = [inner] + ([self.model.get_encoder()] if self.layout.encoder_decoder else [])
        handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
        try:
            out = self.model.generate(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        self._check_applied(batch)
        return out

    def gradient_checkpointing_enable(self, every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the frozen layers in backward to save memory.

        Non-reentrant checkpointing, so the prefix (a keyword argument, not a layer input)
        gets its gradients. ``every_n_layers`` and ``offload`` are passed to transformers.
        """
        kwargs = {"use_reentrant": False}
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is None:  # transformers before activation checkpointing was renamed
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    # ------------------------------------------------------------ artifacts
    def save_prefix(self, directory, name: str = ACTIVE, keep_reparam: bool = False):
        """Write prefix ``name`` as ``prefix_config.json`` + ``prefix.safetensors``.

        The key/values are always stored (folded, ready for inference). With
        ``keep_reparam=True`` the MLP and embedding are stored too, so training can resume.
        """
        encoder = self.prefixes[self._resolve(name)]
        tensors = {"key_values": encoder.raw_key_values()}
        keep = keep_reparam and encoder.reparameterized
        if keep:
            tensors.update({f"reparam.{k}": v for k, v in encoder.state_dict().items()})
        tensors.update(_head_tensors(self.heads))
        meta = {
            "prefix": encoder.config.to_dict(),
            "layers": list(encoder.layers),
            "base": self.shape.to_dict(),
            "reparameterization_saved": keep,
        }
        if self.heads:  # the class names, so a scorer can rebuild the task model (see models.load_model)
            meta["labels"] = class_names(self.model)
        path = write_prefix(directory, meta, tensors)
        if arch.is_peft_model(self.model):  # prefix + LoRA: the adapter goes to DIR/adapter (prefixtune.lora)
            lora.save_adapter(self.model, path)
        return path

    def load_prefix(self, directory, name: str = "default") -> None:
        """Load a prefix saved by :meth:`save_prefix` as ``name`` (replacing one of that name)."""
        meta, tensors = read_prefix(directory)
        saved = arch.ModelShape(**meta["base"])
        problems = saved.mismatches(self.shape)
        if problems:
            raise ValueError(f"{directory}: this prefix was made for another model: " + "; ".join(problems))
        if saved.name_or_path and self.shape.name_or_path and saved.name_or_path != self.shape.name_or_path:
            warnings.warn(f"prefix was trained on {saved.name_or_path!r}, loading onto {self.shape.name_or_path!r}")
        config = PrefixConfig.from_dict(meta["prefix"])
        if not meta.get("reparameterization_saved"):
            config = config.replace(reparameterize=False)
        encoder = PrefixEncoder(config, tuple(meta["layers"]), self.shape.num_kv_heads, self.shape.head_dim)
        _load_encoder(encoder, tensors, directory)
        _load_heads(self.heads, tensors, directory)
        if lora.has_saved_adapter(directory):  # prefix + LoRA: the LoRA weights trained with this prefix
            lora.load_adapter_weights(self.model, directory)
        if name in self.prefixes:
            del self.prefixes[name]
        self._register(name, encoder.to(self.device))


def _rows(kwargs: dict) -> int:
    """Batch size of a model call, from whichever input it was given."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("cannot tell the batch size: give input_ids or inputs_embeds")


def _stack_layers(key_values: Sequence, layers: Sequence[int]) -> torch.Tensor:
    """Per-layer ``(k, v)`` pairs of the given layers as one ``[n, 2, kv_heads, L, head_dim]`` tensor."""
    return torch.stack([torch.stack(key_values[i]) for i in layers])


def _shift(encoder: PrefixEncoder) -> int:
    """How far a row with this prefix moves its positions (its length, if ``shift_positions``)."""
    return encoder.config.prefix_length * encoder.config.shift_positions


def _uniform_key_values(encoder: PrefixEncoder, key_values: torch.Tensor, rows: int, num_layers: int) -> list:
    """Per model layer, ``(k, v)`` each ``[rows, kv_heads, L_p, head_dim]`` (``None`` where the
    prefix has no layer): views of ``key_values`` (``[n_layers, 2, ...]``) broadcast over the rows.

    One ``unbind`` makes all of them, so backward gathers every layer's gradient with one
    ``stack`` and one sum over the rows. Indexing each layer and then keys and values, as
    before, cost five small ops per layer in backward (each ``select`` fills a zero tensor
    the size of its input, and the results are added one by one): about 150 of the 240 ops
    that a prefix added to a 30-layer model's backward (``benchmarks/op_count.py``). The price:
    backward holds each layer's ``[rows, ...]`` gradient until the first layer's arrives, which
    is never more than the activations it has freed by then (each layer saved its keys and
    values, prefix included)."""
    layers, _, kv_heads, length, head_dim = key_values.shape
    slots = key_values.flatten(0, 1).unsqueeze(1).expand(2 * layers, rows, kv_heads, length, head_dim).unbind(0)
    out: list = [None] * num_layers
    for i, layer in enumerate(encoder.layers):
        out[layer] = (slots[2 * i], slots[2 * i + 1])
    return out


def _layer_slice(encoder: PrefixEncoder, key_values: torch.Tensor, layer: int) -> torch.Tensor | None:
    if layer not in encoder.layers:
        return None
    return key_values[encoder.layers.index(layer)]


def _stack_padded(per_prefix: list, lengths: torch.Tensor, width: int):
    """Stack one layer's prefixes, ``[U + 1, 2, kv_heads, width, head_dim]``, zero-padded, with
    a last all-invalid entry for rows without a prefix; and the ``[U + 1, width]`` validity."""
    like = next(p for p in per_prefix if p is not None)
    padded = [
        torch.zeros_like(like[:, :, :1]).expand(*like.shape[:2], width, like.shape[3])
        if p is None else nn.functional.pad(p, (0, 0, 0, width - p.shape[2]))
        for p in per_prefix
    ]
    stacked = torch.stack(padded + [torch.zeros_like(padded[0])])
    present = torch.tensor([p is not None for p in per_prefix] + [False], device=lengths.device)
    valid = torch.arange(width, device=lengths.device)[None, :] < torch.cat([lengths, lengths.new_zeros(1)])[:, None]
    return stacked, valid & present[:, None]


def _head_tensors(heads: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"head.{name}.{key}": value for name, head in heads.items() for key, value in head.state_dict().items()}


def _load_heads(heads: dict[str, nn.Module], tensors: dict, directory) -> None:
    """Copy a saved task head into the model's (the head trains with the prefix, P-Tuning v2)."""
    saved = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    if not saved:
        return
    names = sorted({key.split(".", 1)[0] for key in saved})
    missing = [n for n in names if n not in heads]
    if missing:
        raise ValueError(
            f"{directory}: this prefix carries a task head ({', '.join(names)}) that the model lacks: load the base "
            "model as a task model (e.g. AutoModelForSequenceClassification with the same num_labels)"
        )
    for name in names:
        state = {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".", 1)[0] == name}
        expected = heads[name].state_dict()
        bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if bad:
            shapes = {k: tuple(state[k].shape) for k in bad if k in state}
            raise ValueError(f"{directory}: task head {name!r} does not fit the model (different num_labels?): "
                             f"{bad} missing or of shape {shapes}, model expects "
                             f"{ {k: tuple(expected[k].shape) for k in bad} }")
        with torch.no_grad():
            heads[name].load_state_dict(state)


def _load_encoder(encoder: PrefixEncoder, tensors: dict, directory) -> None:
    if encoder.reparameterized:
        state = {k.removeprefix("reparam."): v for k, v in tensors.items() if k.startswith("reparam.")}
    else:
        state = {"key_values": tensors.get("key_values")}
    expected = encoder.state_dict()
    bad = [k for k in expected if k not in state or state[k] is None or state[k].shape != expected[k].shape]
    if bad:
        raise ValueError(f"{directory}: prefix tensors {bad} are missing or have the wrong shape")
    encoder.load_state_dict(state)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
