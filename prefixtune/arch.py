"""Architecture facts, as data.

Each supported ``model_type`` maps to a :class:`Layout`: where its transformer blocks
live, which attribute of a block is the self-attention, and how the base model numbers
tokens when it is given no ``position_ids``. Head counts and sizes come from the model's
config through the names transformers standardises (``num_key_value_heads``,
``head_dim``...), so most families need one line here. Nothing else in the package
branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class Layout:
    """Where the pieces of one model family live.

    Args:
        layers: Dotted path, from ``model.base_model``, to the ``ModuleList`` of blocks.
        attention: Attribute of one block that holds its self-attention module.
        positions: How the base model numbers tokens when called without
            ``position_ids``: ``"arange"`` (``past, past+1, ...``) or ``"mask"``
            (cumulative sum of the attention mask, as OPT does). The prefix shift is added
            on top, so a row without a prefix sees exactly the base model's positions.
    """

    layers: str
    attention: str
    positions: str = "arange"


_DECODER = Layout(layers="layers", attention="self_attn")

LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout(layers="h", attention="attn"),
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi3": _DECODER,
    "gpt_neox": Layout(layers="layers", attention="attention"),
    "opt": Layout(layers="decoder.layers", attention="self_attn", positions="mask"),
}

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
"""Base attention kernels the prefix can wrap (flash/flex kernels take other mask types)."""


@dataclass(frozen=True)
class ModelShape:
    """The facts a prefix must agree with to be loaded onto a model."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    name_or_path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatches(self, other: "ModelShape") -> list[str]:
        """Human-readable differences that make a prefix unusable on ``other``."""
        return [
            f"{key}: prefix has {getattr(self, key)!r}, model has {getattr(other, key)!r}"
            for key in ("model_type", "num_layers", "num_kv_heads", "head_dim")
            if getattr(self, key) != getattr(other, key)
        ]


def layout_for(model: nn.Module) -> Layout:
    """The layout of ``model``'s family, or a clear error naming what is missing."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise TypeError(
            f"{type(model).__name__} has no config.model_type: prefixtune wraps Hugging Face "
            "transformers models (PreTrainedModel)"
        )
    if model_type not in LAYOUTS:
        raise NotImplementedError(
            f"prefixtune has no layout for model_type {model_type!r}. Supported: "
            f"{', '.join(sorted(LAYOUTS))}. A new decoder family needs one entry in "
            "prefixtune/arch.py (where its blocks and self-attention live) and a parity test."
        )
    return LAYOUTS[model_type]


def model_shape(model: nn.Module) -> ModelShape:
    """Layer count, key/value heads and head size from the model's config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        model_type=model.config.model_type,
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        name_or_path=str(getattr(model.config, "name_or_path", "") or ""),
    )


def attention_modules(model: nn.Module, layout: Layout) -> list[nn.Module]:
    """The self-attention module of every block, in layer order."""
    root = getattr(model, "base_model", model)
    try:
        blocks = root.get_submodule(layout.layers)
    except AttributeError as err:
        raise NotImplementedError(
            f"{type(model).__name__}: expected its blocks at {layout.layers!r} under "
            f"{type(root).__name__} (prefixtune/arch.py); the model's structure differs"
        ) from err
    return [getattr(block, layout.attention) for block in blocks]


def resolve_layers(layers: tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    """Normalise a layer selection (negative indices allowed) to sorted, unique indices."""
    if layers is None:
        return tuple(range(num_layers))
    out = set()
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"layer {index} is out of range for a model with {num_layers} layers")
        out.add(index % num_layers)
    return tuple(sorted(out))
