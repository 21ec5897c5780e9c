"""Architecture facts, as data.

Each supported ``model_type`` maps to a :class:`Family`: where its transformer blocks
live, which attribute of a block is the self-attention, and how the base model numbers
tokens when it is given no ``position_ids``. Head counts and sizes come from the model's
config through the names transformers standardises (``num_key_value_heads``,
``head_dim``...), so most families need one line here. Nothing else in the package
branches on ``model_type``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .config import TARGETS
from .peft.wrappers import unwrap_adapters

GROUPS = TARGETS
"""The kinds of attention a prefix can enter (Li & Liang 2021, section 4.2, for BART):
the encoder's self-attention, the decoder's self-attention, and the decoder's attention
over the encoder (cross-attention). A decoder-only model has just "decoder"; an
encoder-only model just "encoder"."""


@dataclass(frozen=True)
class AttentionGroup:
    """One kind of attention in a model family, and where its modules live.

    Args:
        name: One of :data:`GROUPS`.
        layers: Dotted path, from ``model.base_model``, to the ``ModuleList`` of blocks.
        attention: Dotted path, inside one block, to the attention module.
        causal: Whether its queries see only earlier keys (decoder self-attention). The
            prefix columns are visible to every query either way.
    """

    name: str
    layers: str
    attention: str
    causal: bool


@dataclass(frozen=True)
class Family:
    """Where the pieces of one model family live.

    Args:
        groups: The attentions that can take a prefix, in a fixed order. Their modules,
            group after group and layer after layer, are the prefix's "sites": site ``i``
            of a prefix is row ``i`` of its key/values.
        positions: How the base model numbers tokens when called without
            ``position_ids``: ``"arange"`` (``past, past+1, ...``), ``"mask"`` (cumulative
            sum of the attention mask, as OPT does), or ``"internal"`` (the model computes
            positions itself and takes no ``position_ids``: T5's relative bias, BART's
            learned positions, encoders; the prefix then shifts nothing). For the first two
            the prefix shift is added on top, so a row without a prefix sees exactly the
            base model's positions.
        head_dim: Config key of the head size where it is not ``hidden_size / heads``.
        heads: Attributes of the task model (``...ForSequenceClassification`` and
            ``...ForTokenClassification``) that form its task head, trained and saved with
            the prefix as in P-Tuning v2 (Liu et al. 2022). Absent ones are skipped.
    """

    groups: tuple[AttentionGroup, ...]
    positions: str = "arange"
    head_dim: str | None = None
    heads: tuple[str, ...] = ()

    @property
    def encoder_decoder(self) -> bool:
        return any(group.name == "cross" for group in self.groups)


def _decoder(layers: str = "layers", attention: str = "self_attn", positions: str = "arange") -> Family:
    return Family(groups=(AttentionGroup("decoder", layers, attention, causal=True),), positions=positions)


def _encoder(layers: str, attention: str, heads: tuple[str, ...]) -> Family:
    return Family(groups=(AttentionGroup("encoder", layers, attention, causal=False),), positions="internal",
                  heads=heads)


def _seq2seq(blocks: tuple[str, str], attention: tuple[str, str, str], head_dim: str | None = None) -> Family:
    encoder_blocks, decoder_blocks = blocks
    encoder_self, decoder_self, cross = attention
    return Family(
        groups=(
            AttentionGroup("encoder", encoder_blocks, encoder_self, causal=False),
            AttentionGroup("decoder", decoder_blocks, decoder_self, causal=True),
            AttentionGroup("cross", decoder_blocks, cross, causal=False),
        ),
        positions="internal", head_dim=head_dim, heads=("classification_head",),
    )


_T5 = _seq2seq(("encoder.block", "decoder.block"),
               ("layer.0.SelfAttention", "layer.0.SelfAttention", "layer.1.EncDecAttention"), head_dim="d_kv")
_BART = _seq2seq(("encoder.layers", "decoder.layers"), ("self_attn", "self_attn", "encoder_attn"))
_BERT = _encoder("encoder.layer", "attention.self", heads=("classifier",))

FAMILIES: dict[str, Family] = {
    "gpt2": _decoder(layers="h", attention="attn"),
    "llama": _decoder(),
    "mistral": _decoder(),
    "qwen2": _decoder(),
    "qwen3": _decoder(),
    "gemma": _decoder(),
    "gemma2": _decoder(),
    "phi3": _decoder(),
    "gpt_neox": _decoder(attention="attention"),
    "opt": _decoder(layers="decoder.layers", positions="mask"),
    "t5": _T5,
    "mt5": _T5,
    "bart": _BART,
    "mbart": _BART,
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": _encoder("transformer.layer", "attention", heads=("pre_classifier", "classifier")),
}

UNSUPPORTED: dict[str, str] = {
    "deberta-v2": "DeBERTa-v2 computes attention in its own code, not through transformers' AttentionInterface, "
                  "so a prefix cannot reach it without copying the model's code (which prefixtune never does)",
}

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
"""Base attention kernels the prefix can wrap (flash/flex kernels take other mask types)."""


@dataclass(frozen=True)
class ModelShape:
    """The facts a prefix must agree with to be loaded onto a model.

    ``num_layers`` counts the prefix's sites (every attention module of every group);
    ``groups`` says how many of them each group has, in family order. For a decoder-only
    model the two agree: one site per layer.
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    name_or_path: str = ""
    groups: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.groups:  # artifacts written before groups existed: decoder-only models
            object.__setattr__(self, "groups", {"decoder": self.num_layers})

    def to_dict(self) -> dict:
        return asdict(self)

    def mismatches(self, other: "ModelShape") -> list[str]:
        """Human-readable differences that make a prefix unusable on ``other``."""
        return [
            f"{key}: prefix has {getattr(self, key)!r}, model has {getattr(other, key)!r}"
            for key in ("model_type", "num_layers", "num_kv_heads", "head_dim", "groups")
            if getattr(self, key) != getattr(other, key)
        ]


def family_of(model: nn.Module) -> Family:
    """The architecture facts of ``model``'s family, or a clear error naming what is missing."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise TypeError(
            f"{type(model).__name__} has no config.model_type: prefixtune wraps Hugging Face "
            "transformers models (PreTrainedModel)"
        )
    if model_type in UNSUPPORTED:
        raise NotImplementedError(f"model_type {model_type!r} cannot take a prefix: {UNSUPPORTED[model_type]}")
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"prefixtune has no architecture entry for model_type {model_type!r}. Supported: "
            f"{', '.join(sorted(FAMILIES))}. A new family needs one entry in prefixtune/arch.py "
            "(where its blocks and attentions live) and a parity test."
        )
    return FAMILIES[model_type]


def model_shape(model: nn.Module, family: Family | None = None) -> ModelShape:
    """Sites, key/value heads and head size of ``model``."""
    family = family or family_of(model)
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, family.head_dim or "head_dim", None) or config.hidden_size // heads
    groups = {group.name: len(_blocks(model, group)) for group in family.groups}
    return ModelShape(
        model_type=model.config.model_type,
        num_layers=sum(groups.values()),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        name_or_path=str(getattr(model.config, "name_or_path", "") or ""),
        groups=groups,
    )


def attention_modules(model: nn.Module, family: Family) -> list[tuple[AttentionGroup, nn.Module]]:
    """Every site's attention module with its group: group after group, layer after layer."""
    return [(group, block.get_submodule(group.attention)) for group in family.groups for block in _blocks(model, group)]


def _blocks(model: nn.Module, group: AttentionGroup) -> nn.ModuleList:
    model = unwrap_adapters(model)  # prefix + LoRA: the blocks live inside PEFT's wrappers
    root = getattr(model, "base_model", model)
    try:
        return root.get_submodule(group.layers)
    except AttributeError as err:
        raise NotImplementedError(
            f"{type(model).__name__}: expected its {group.name} blocks at {group.layers!r} under "
            f"{type(root).__name__} (prefixtune/arch.py); the model's structure differs"
        ) from err


def task_heads(model: nn.Module, family: Family) -> dict[str, nn.Module]:
    """The task head modules ``model`` has (see ``Family.heads``), by attribute name."""
    return {name: getattr(model, name) for name in family.heads if isinstance(getattr(model, name, None), nn.Module)}


def resolve_sites(layers: tuple[int, ...] | None, targets: tuple[str, ...], shape: ModelShape) -> tuple[int, ...]:
    """The site indices of the chosen ``layers`` (within each group) of the ``targets`` groups."""
    chosen = [name for name in shape.groups if name in targets]
    if not chosen:
        raise ValueError(
            f"targets {tuple(targets)} name no attention of this model; it has: {', '.join(shape.groups)}"
        )
    sites, start = [], 0
    for name, count in shape.groups.items():
        if name in chosen:
            sites += [start + layer for layer in resolve_layers(layers, count)]
        start += count
    return tuple(sites)


def resolve_layers(layers: tuple[int, ...] | None, num_layers: int) -> tuple[int, ...]:
    """Normalise a layer selection (negative indices allowed) to sorted indices; two that name one layer
    (``-1`` and ``1`` of two) are refused, as the same index twice is, so a selection means what it says."""
    if layers is None:
        return tuple(range(num_layers))
    out: dict[int, int] = {}
    for index in layers:
        if not -num_layers <= index < num_layers:
            raise ValueError(f"--layers: layer {index} is out of range for a model with {num_layers} layers")
        if index % num_layers in out:
            raise ValueError(f"--layers: {out[index % num_layers]} and {index} name the same layer of this model's "
                             f"{num_layers}")
        out[index % num_layers] = index
    return tuple(sorted(out))
