"""Which kernel a prefixed attention call reaches: the routes and the measured rule that picks one.

The routes (``pad``, ``grouped``, ``stock``) are described in :mod:`prefixtune.attention`; the
thresholds here come from ``benchmarks/results/attention-kernel.json`` (CPU) and
``benchmarks/results/gpu.json`` (CUDA).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

PAD, GROUPED, STOCK = "pad", "grouped", "stock"

PAD_FREE_ROWS: Mapping[str, int] = MappingProxyType({"cpu": 384})
"""Per device type, how many query rows beyond twice the prefix length a call needs before
``pad`` pays; on devices not listed ``pad`` is used wherever it at most doubles the queries.
torch's CPU flash kernel skips the key blocks above the diagonal under ``is_causal`` but not
under a mask, and that saving outweighs ``L_p`` extra query rows only on long rows (forward +
backward of one layer: ``benchmarks/results/attention-kernel.json``). On CUDA, ``pad`` was
measured faster than the masked kernel or on par with it at every length (``benchmarks/results/gpu.json``)."""

GROUPED_DEVICES = frozenset({"cpu"})
"""Device types whose SDPA kernels take a mask together with grouped key/value heads. On CUDA
that combination falls back to the math kernel (transformers' ``use_gqa_in_sdpa`` says so), so
masked calls there keep the stock kernel."""


@dataclass(frozen=True)
class AttentionPolicy:
    """How a prefixed attention call reaches a kernel; held by each ``PrefixModel``.

    Args:
        mode: ``"auto"`` (the default): the measured route for each call (:meth:`route`);
            ``"mask"``: always the model's own kernel with the widened mask, the reference.
        pad_free_rows: The ``pad`` thresholds per device type (:data:`PAD_FREE_ROWS`);
            ``None`` for a device pads wherever it fits.
    """

    mode: str = "auto"
    pad_free_rows: Mapping[str, int | None] = field(default_factory=lambda: dict(PAD_FREE_ROWS))

    MODES = ("auto", "mask")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise ValueError(f"attention={self.mode!r}: choose one of {', '.join(self.MODES)}")

    @classmethod
    def of(cls, value: "str | AttentionPolicy") -> "AttentionPolicy":
        """A policy from its mode's name, or the policy itself."""
        return value if isinstance(value, AttentionPolicy) else cls(mode=value)

    def route(self, base: str, device_type: str, q_len: int, extra: int, *, causal: bool, masked: bool,
              grouped_heads: bool, plain: bool) -> str:
        """The route of one call: ``pad``, ``grouped`` or ``stock``.

        Args:
            base: The wrapped kernel (``sdpa`` or ``eager``).
            device_type: Where the call runs (``cpu``, ``cuda``...).
            q_len: Query rows of the call; ``extra``: key columns before the first query's own (the
                prefix, and tokens cached before this call).
            causal: A decoder self-attention; ``masked``: it has padding or per-row prefix slots.
            grouped_heads: Fewer key/value heads than query heads.
            plain: No position bias (T5) and no soft-capping (Gemma 2), which only the stock kernel applies.
        """
        if self.mode == "mask" or base != "sdpa" or not plain or q_len < 2:
            return STOCK
        if causal and not masked:
            if self.pads(device_type, q_len, extra):
                return PAD
            return GROUPED if device_type in GROUPED_DEVICES else STOCK
        return GROUPED if masked and grouped_heads and device_type in GROUPED_DEVICES else STOCK

    def pads(self, device_type: str, q_len: int, extra: int) -> bool:
        """Whether an unpadded causal call takes ``pad``: its ``extra`` zero query rows at most
        double the queries, and the device's :data:`PAD_FREE_ROWS` threshold is met."""
        if extra > q_len:
            return False
        free = self.pad_free_rows.get(device_type)
        return free is None or 2 * extra <= q_len - free


DEFAULT_POLICY = AttentionPolicy()
