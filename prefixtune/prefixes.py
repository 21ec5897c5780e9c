"""The named prefixes of one model, and how a call's prefixes are laid out per batch row.

A :class:`PrefixRegistry` holds any number of prefixes by name, one of them active, of either
kind: a :class:`~prefixtune.encoder.PrefixEncoder` (``kv``: key/values in front of the input's)
or a :class:`~prefixtune.memory.MemoryPrefix` (``memory``: a term on each head's output). For
each forward call it turns ``prefix=`` (one name for every row, or one name or ``None`` per row)
into a :class:`PrefixBatch`: per model site, the key/values of every row, ``[B, kv_heads, L,
head_dim]``, which the attention (:mod:`prefixtune.attention`) puts in front of that site's own
keys and values, and the memory of every row, ``[B, kv_heads, head_dim + 1, head_dim]``, whose term
it adds to the output. A row carries one kind, or none; one batch may mix all three.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .encoder import PrefixEncoder
from .memory import folded

ACTIVE = "__active__"
"""Default of ``prefix=``: the active prefix (the first one added, or ``set_active``)."""


@dataclass
class PrefixBatch:
    """The prefix of one forward call, already laid out per row.

    Args:
        key_values: Per model site, ``(k, v)`` each ``[B, kv_heads, L, head_dim]``, or
            ``None`` where no row has a prefix at that site.
        valid: Per model site, ``[B, L]`` bool marking real prefix slots, or ``None``
            when every slot of every row is real (then no mask work is needed).
        offsets: ``[B]`` position shift of each row (its prefix length, or 0).
        shift: the one shift of every row when they share it, else ``None``: then the
            positions stay ``[1, T]``, as the base model makes them.
        policy: How the attention reaches its kernel (:class:`prefixtune.attention.AttentionPolicy`):
            the model's own, filled in by ``PrefixModel`` when ``None``.
        in_cache: Sites whose keys/values arrive with the prefix already in front
            (:mod:`prefixtune.cache`).
        routes: Filled by the attention: the kernel route each prefixed site took in this call.
        memory: Per model site, ``[B | 1, kv_heads, head_dim + 1, head_dim]`` (one row: every row's), each
            memory as the attention reads it (``prefixtune.memory.folded``), zeros for rows without a
            memory, or ``None`` where no row has one; empty when no row has a memory anywhere.
    """

    key_values: list[tuple[torch.Tensor, torch.Tensor] | None]
    valid: list[torch.Tensor | None]
    offsets: torch.Tensor
    shift: int | None = None
    policy: object = None
    in_cache: frozenset[int] = frozenset()
    routes: dict[int, str] = field(default_factory=dict)
    memory: list[torch.Tensor | None] = field(default_factory=list)
    features: dict = field(default_factory=dict)
    """Filled by a decoding step's memory term (:func:`prefixtune.memory.add_memory_term`): its feature
    buffers, one per batch size, layout and dtype (the key says which), made once per ``generate`` call and
    shared by the copies :meth:`expand_rows` and :meth:`cast` make, as ``routes`` is."""

    @property
    def batch_size(self) -> int:
        return self.offsets.shape[0]

    def memory_at(self, site: int) -> torch.Tensor | None:
        """The rows' memories at ``site`` (``None``: no row has one there)."""
        return self.memory[site] if self.memory else None

    @property
    def kv_layers(self) -> frozenset[int]:
        """The sites that get key/values in front of their own in this call."""
        return frozenset(i for i, kv in enumerate(self.key_values) if kv is not None)

    @property
    def prefixed_layers(self) -> frozenset[int]:
        """The sites that carry a prefix of either kind in this call."""
        return self.kv_layers | frozenset(i for i, m in enumerate(self.memory) if m is not None)

    def expand_rows(self, batch_size: int) -> "PrefixBatch":
        """Repeat each row ``batch_size // B`` times, as beam search and ``num_return_sequences`` do
        with ``repeat_interleave``. The copy shares ``routes``, so the caller sees where it went."""
        if batch_size == self.batch_size:
            return self

        def rep(t):
            return None if t is None else repeat_rows(t, batch_size)

        return replace(self, key_values=[None if kv is None else (rep(kv[0]), rep(kv[1])) for kv in self.key_values],
                       valid=[rep(v) for v in self.valid], offsets=rep(self.offsets),
                       memory=[m if m is None or m.shape[0] == 1 else rep(m) for m in self.memory])

    def cast(self, dtype: torch.dtype) -> "PrefixBatch":
        """The same prefix in ``dtype``: done once per ``generate`` call, so that a bf16/fp16 model
        does not convert the float32 prefix again in every layer at every decoding step."""
        return replace(self, key_values=[None if kv is None else (kv[0].to(dtype), kv[1].to(dtype))
                                         for kv in self.key_values],
                       memory=[None if m is None else m.to(dtype) for m in self.memory])


def repeat_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with each row repeated to make ``rows`` rows, as beam search and
    ``num_return_sequences`` repeat the inputs (``repeat_interleave``)."""
    if t.shape[0] == rows:
        return t
    if rows % t.shape[0]:
        raise ValueError(f"batch of {rows} rows cannot carry a prefix made for {t.shape[0]} rows")
    return t.repeat_interleave(rows // t.shape[0], dim=0)


PrefixArg = str | None | Sequence[str | None] | PrefixBatch


class PrefixRegistry(nn.ModuleDict):
    """Named prefix encoders and the active name; lays out a call's prefixes (:meth:`batch`)."""

    def __init__(self):
        super().__init__()
        self.active: str | None = None

    def add(self, name: str, encoder: PrefixEncoder, replace_existing: bool = False) -> None:
        """Register ``encoder`` as ``name``; the first prefix added becomes the active one."""
        if not name or name == ACTIVE or (name in self and not replace_existing):
            raise ValueError(f"prefix name {name!r} is empty, reserved or already used")
        self[name] = encoder
        if self.active is None:
            self.active = name

    def remove(self, name: str) -> None:
        del self[self.known(name)]
        if self.active == name:
            self.active = next(iter(self), None)

    def set_active(self, name: str) -> None:
        self.active = self.known(name)

    def known(self, name: str) -> str:
        if name not in self:
            raise KeyError(f"no prefix named {name!r}; this model has: {', '.join(self) or 'none'}")
        return name

    def resolve(self, name: str) -> str:
        """``name``, or the active prefix's name for :data:`ACTIVE`."""
        if name == ACTIVE:
            if self.active is None:
                raise ValueError("this PrefixModel has no prefix yet; add one with add_prefix()")
            return self.active
        return self.known(name)

    def batch(self, prefix: PrefixArg, rows: int, num_sites: int, device) -> PrefixBatch | None:
        """Lay out ``prefix`` (one name, or one name / ``None`` per row) for a batch of ``rows``;
        a :class:`PrefixBatch` (one laid out already, e.g. by ``prefixtune.serve``) is used as it is."""
        if isinstance(prefix, PrefixBatch):
            return prefix
        return batch_for_rows([None if n is None else self[n] for n in self._row_names(prefix, rows)], num_sites, device)

    def _row_names(self, prefix: PrefixArg, rows: int) -> list[str | None]:
        if prefix is None or isinstance(prefix, str):
            return [self.resolve(prefix)] * rows if prefix is not None else [None] * rows
        names = list(prefix)
        if len(names) != rows:
            raise ValueError(f"prefix= lists {len(names)} names for a batch of {rows} rows")
        return [None if n is None else self.resolve(n) for n in names]


def batch_for_rows(row_encoders: Sequence[nn.Module | None], num_sites: int, device) -> PrefixBatch | None:
    """The :class:`PrefixBatch` of a call whose row ``i`` carries ``row_encoders[i]`` (``None``: no
    prefix); each distinct prefix runs once. Registries and servers (which keep their prefixes
    elsewhere) lay out their calls here."""
    if all(e is None for e in row_encoders):
        return None
    kv_rows = [e if e is not None and e.kind == "kv" else None for e in row_encoders]
    memory_rows = [e if e is not None and e.kind == "memory" else None for e in row_encoders]
    batch = _kv_batch(kv_rows, num_sites, device)
    batch.memory = _memory(memory_rows, num_sites, device)
    return batch


def _kv_batch(row_encoders: list, num_sites: int, device) -> PrefixBatch:
    """The key/value part of a call (rows of another kind count as rows without a prefix here)."""
    unique = list({id(e): e for e in row_encoders if e is not None}.values())
    rows = len(row_encoders)
    if not unique:
        return PrefixBatch(key_values=[None] * num_sites, valid=[None] * num_sites,
                           offsets=torch.zeros(rows, dtype=torch.long, device=device), shift=0)
    made = [encoder() for encoder in unique]  # each [n_sites, 2, kv_heads, L_p, head_dim]
    if len(unique) == 1 and None not in row_encoders:  # one prefix for every row: what training sends
        shift = _shift(unique[0])
        return PrefixBatch(key_values=_uniform(unique[0], made[0], rows, num_sites), valid=[None] * num_sites,
                           offsets=torch.full((rows,), shift, device=device), shift=shift)
    index = {id(e): i for i, e in enumerate(unique)}
    return _mixed(unique, made, [len(unique) if e is None else index[id(e)] for e in row_encoders], num_sites, device)


def _memory(row_memories: list, num_sites: int, device) -> list[torch.Tensor | None]:
    """Per site, every row's memory: ``[1, ...]`` when one memory serves every row, else ``[B, ...]``
    with zeros for the rows without one (their term is then exactly zero); empty without any memory."""
    unique = list({id(m): m for m in row_memories if m is not None}.values())
    if not unique:
        return []
    made = [folded(prefix()) for prefix in unique]  # each [n_sites, kv_heads, head_dim + 1, head_dim]
    out: list = [None] * num_sites
    if len(unique) == 1 and None not in row_memories:
        for slot, site in enumerate(unique[0].layers):
            out[site] = made[0][slot].unsqueeze(0)
        return out
    index = {id(m): i for i, m in enumerate(unique)}
    row_index = torch.tensor([len(unique) if m is None else index[id(m)] for m in row_memories], device=device)
    like = made[0][0]
    for site in sorted({s for m in unique for s in m.layers}):
        per_prefix = [kv[m.layers.index(site)] if site in m.layers else torch.zeros_like(like)
                      for m, kv in zip(unique, made)]
        stacked = torch.stack(per_prefix + [torch.zeros_like(like)])  # [U + 1, kv_heads, head_dim + 1, head_dim]
        out[site] = stacked.index_select(0, row_index)
    return out


def _shift(encoder: PrefixEncoder) -> int:
    """How far a row with this prefix moves its positions (its length, if ``shift_positions``)."""
    return encoder.config.prefix_length * encoder.config.shift_positions


def _uniform(encoder: PrefixEncoder, key_values: torch.Tensor, rows: int, num_sites: int) -> list:
    """Per model site, ``(k, v)`` each ``[rows, kv_heads, L_p, head_dim]`` (``None`` where the
    prefix has no site): views of ``key_values`` (``[n_sites, 2, ...]``) broadcast over the rows.

    One ``unbind`` makes all of them, so backward gathers every site's gradient with one
    ``stack`` and one sum over the rows, where indexing each site and then keys and values costs
    five small ops per site in backward (``benchmarks/op_count.py`` counts them). Backward holds
    each site's ``[rows, ...]`` gradient until the first site's arrives, which is never more than
    the activations it has freed by then (each layer saved its keys and values, prefix included)."""
    sites, _, kv_heads, length, head_dim = key_values.shape
    slots = key_values.flatten(0, 1).unsqueeze(1).expand(2 * sites, rows, kv_heads, length, head_dim).unbind(0)
    out: list = [None] * num_sites
    for i, site in enumerate(encoder.layers):
        out[site] = (slots[2 * i], slots[2 * i + 1])
    return out


def _mixed(encoders: list[PrefixEncoder], made: list[torch.Tensor], index: list[int], num_sites: int,
           device) -> PrefixBatch:
    """Rows with different prefixes (or none: ``index`` = ``len(encoders)``), each site's
    prefixes zero-padded to the longest, with per-row validity where they differ."""
    width = max(kv.shape[3] for kv in made)
    row_index = torch.tensor(index, device=device)
    lengths = torch.tensor([e.config.prefix_length for e in encoders], device=device)
    shifts = [_shift(e) for e in encoders] + [0]
    row_shifts = {shifts[i] for i in index}
    batch = PrefixBatch(key_values=[], valid=[], offsets=torch.tensor(shifts, device=device)[row_index],
                        shift=row_shifts.pop() if len(row_shifts) == 1 else None)
    for site in range(num_sites):
        per_prefix = [_site_slice(e, kv, site) for e, kv in zip(encoders, made)]  # [2, kvh, L, hd] | None
        if all(p is None for p in per_prefix):
            batch.key_values.append(None)
            batch.valid.append(None)
            continue
        stacked, valid = _stack_padded(per_prefix, lengths, width)
        # index_select, not stacked[row_index]: advanced indexing is ~2000x slower per layer on CPU
        gathered = stacked.index_select(0, row_index)  # [B, 2, kv_heads, width, head_dim]
        batch.key_values.append((gathered[:, 0], gathered[:, 1]))
        # every row's every slot real (all rows prefixed, equal lengths, this site in each):
        # no mask to build, so attention keeps its mask-free path
        full = len(encoders) not in index and all(p is not None and p.shape[2] == width for p in per_prefix)
        batch.valid.append(None if full else valid.index_select(0, row_index))
    return batch


def _site_slice(encoder: PrefixEncoder, key_values: torch.Tensor, site: int) -> torch.Tensor | None:
    if site not in encoder.layers:
        return None
    return key_values[encoder.layers.index(site)]


def _stack_padded(per_prefix: list, lengths: torch.Tensor, width: int):
    """Stack one site's prefixes, ``[U + 1, 2, kv_heads, width, head_dim]``, zero-padded, with
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

