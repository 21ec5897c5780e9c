"""Typed configuration of one prefix.

Everything a prefix is, apart from its numbers, lives here as a plain dataclass, so the
same object drives construction, is written next to the weights as JSON, and is read
back without any pickle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

INITS = ("random", "text")


@dataclass
class PrefixConfig:
    """How to build one trainable prefix (Li & Liang 2021, arXiv:2101.00190).

    Args:
        prefix_length: ``L_p``, the number of key/value positions put in front of every
            prefixed attention layer. The paper uses 5-10 for table-to-text and 200 for
            summarization.
        reparameterize: Produce the prefix through the paper's MLP (embedding ->
            Linear -> Tanh -> Linear) instead of training the key/values directly
            (P-Tuning v2 style). The paper reports that the MLP stabilises training; it
            can be folded away afterwards with ``PrefixModel.materialize``.
        reparam_hidden_size: Width of the embedding and of the MLP's hidden layer
            (the paper's ``mid_dim``, 512).
        dropout: Dropout on the prefix key/values while training (the paper's
            ``prefix_dropout``). Has no effect in eval mode.
        init: ``"random"``, or ``"text"`` to start from the frozen model's own
            key/values for ``init_text`` (the paper's "initialize with real words",
            which matters most in low-data settings, section 7.2).
        init_text: The text whose activations seed the prefix when ``init="text"``.
            Its tokens are repeated or cut to exactly ``prefix_length`` tokens.
        init_std: Standard deviation of the random initialization of a flat prefix.
        init_fit_steps: When ``init="text"`` and ``reparameterize=True``, the number of
            Adam steps used to fit the MLP so that it reproduces those activations.
        layers: Indices of the attention layers that get a prefix; ``None`` means all.
            Negative indices count from the end, as in Python.
        shift_positions: Give the real tokens positions ``L_p, L_p+1, ...`` (the
            original GPT-2 implementation and PEFT do so). Then a prefix equal to the
            model's own key/values for tokens ``p`` makes the model behave exactly as on
            ``p + x``. With ``False`` the real tokens keep positions ``0, 1, ...``.
    """

    prefix_length: int = 10
    reparameterize: bool = True
    reparam_hidden_size: int = 512
    dropout: float = 0.0
    init: str = "random"
    init_text: str | None = None
    init_std: float = 0.02
    init_fit_steps: int = 400
    layers: tuple[int, ...] | None = None
    shift_positions: bool = True

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid PrefixConfig: " + "; ".join(problems))

    def _problems(self):
        if not isinstance(self.prefix_length, int) or self.prefix_length < 1:
            yield f"prefix_length must be a positive integer, got {self.prefix_length!r}"
        if self.reparam_hidden_size < 1:
            yield f"reparam_hidden_size must be >= 1, got {self.reparam_hidden_size!r}"
        if not 0.0 <= self.dropout < 1.0:
            yield f"dropout must be in [0, 1), got {self.dropout!r}"
        if self.init not in INITS:
            yield f"init must be one of {INITS}, got {self.init!r}"
        if self.init == "text" and not self.init_text:
            yield "init='text' needs init_text, the text whose activations seed the prefix"
        if self.layers is not None and len(self.layers) == 0:
            yield "layers must name at least one layer (or be None for all layers)"
        if self.init_fit_steps < 0:
            yield f"init_fit_steps must be >= 0, got {self.init_fit_steps!r}"

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        if out["layers"] is not None:
            out["layers"] = list(out["layers"])
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PrefixConfig":
        """Build from ``to_dict`` output; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PrefixConfig field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> "PrefixConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
