"""The memory prefix: a prefix that sits outside the attention's softmax.

A key/value prefix shares one softmax with the input: ``softmax([q·P_K ; q·K])``. A long input
then dilutes what the prefix adds to each head's output, and a long prefix crowds out the input.
PrefixMemory-Tuning (Wang, Chen, Li, Liang, Lee, Kawaguchi and Hu, ICLR 2026, arXiv:2506.13674,
first titled "Prefix-Tuning+") writes the prefix's share of a head's output in linear-attention
form, ``φ(q)ᵀ Σ_j φ(p_k,j) p_v,jᵀ = φ(q)ᵀ M``, and adds it to the head's output instead of
normalizing it with the input: ``o = softmax(q·K) V + φ(q)ᵀ M``. ``M`` is what trains.

Here, per prefixed attention module and per key/value head (the heads a key/value prefix has,
shared by the query heads of a group as its keys are), ``M`` is ``[head_dim, head_dim]``; it
starts at zero, so training starts from exactly the base model. The feature map is the positive
one of linear attention (Katharopoulos et al. 2020), ``elu(x) + 1``, applied to the query at the
attention's own scale and divided by the head size: ``φ(q) = (elu(q · scaling) + 1) / head_dim``.
The division by the feature size (never by the sequence length) makes a step of the rate move
the output by about that much whatever the head size, so one rate serves every model.

The term depends on the current query alone, so decoding with a key/value cache is exact, and a
memory prefix puts nothing in the cache and shifts no position.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PrefixConfig


class MemoryPrefix(nn.Module):
    """The memories of one named memory prefix.

    Args:
        config: The prefix's configuration (``kind="memory"``; its dropout applies to the memory).
        layers: Model sites that get a memory (already resolved).
        num_kv_heads: Key/value heads per site: one memory each.
        head_dim: Size of one head.
    """

    kind = "memory"

    def __init__(self, config: PrefixConfig, layers: tuple[int, ...], num_kv_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.layers = layers
        self.shape = (len(layers), num_kv_heads, head_dim, head_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.memory = nn.Parameter(torch.zeros(self.shape))

    reparameterized = False

    def forward(self) -> torch.Tensor:
        """The memories, ``[n_sites, kv_heads, head_dim, head_dim]``, dropout applied."""
        return self.dropout(self.memory)

    def raw_memory(self) -> torch.Tensor:
        """The memories without dropout."""
        return self.memory

    def materialize(self) -> None:
        """Nothing to fold: the memory is trained directly."""

    def rate_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The memory trains at the rate."""
        return [([self.memory], 1.0)]


def folded(memory: torch.Tensor) -> torch.Tensor:
    """``memory`` (``[..., head_dim, head_dim]``) as :func:`memory_term` reads it: ``M' = M / head_dim`` with its
    column sums ``1ᵀM'`` as one more row, ``[..., head_dim + 1, head_dim]``. Made once per call (a prefix's
    layout), so that the constant part of ``φ`` costs no operation of its own: the products' bias, or, in a
    decoding step, one more row of the product."""
    scaled = memory / memory.shape[-1]
    return torch.cat([scaled, scaled.sum(-2, keepdim=True)], dim=-2)


PER_HEAD_ROWS = 512
"""From this many query rows (batch x length) up, :func:`memory_term` runs one product per head; below,
one per key/value group. ``python -m benchmarks.memory_term`` times both on SmolLM2's shapes: forward,
per head takes about 2.4x the time of one decoding token and 0.6x at 8 x 128 and 8 x 512 rows, crossing
near 512 rows; with the backward pass per head wins at 8 x 512 and not below."""


def add_memory_term(output: torch.Tensor, query: torch.Tensor, memory: torch.Tensor, scaling: float,
                    scratch: dict) -> torch.Tensor:
    """``output + φ(q)ᵀ M``: the attention's output ``[B, T, heads, head_dim]`` with the memory's term.

    A decoding step (one query per row, no gradients) adds it in place (:func:`_add_decoding_term_`);
    everything else goes through :func:`memory_term`. ``scratch`` keeps the decoding step's feature buffer
    from layer to layer and step to step (the call's ``PrefixBatch.features``)."""
    if query.shape[2] == 1 and not torch.is_grad_enabled() and output.is_contiguous():
        return _add_decoding_term_(output, query, memory.to(query.dtype), scaling, scratch)
    return output + memory_term(query, memory, scaling)


def _add_decoding_term_(output: torch.Tensor, query: torch.Tensor, memory: torch.Tensor, scaling: float,
                        scratch: dict) -> torch.Tensor:
    """One query per row, added into ``output`` where it lies: ``elu(q · scaling)`` goes into a buffer whose
    last column is ones, laid out for one batched product per key/value group, which then multiplies
    ``[elu(q · scaling), 1]`` by the :func:`folded` memory ``[M'; 1ᵀM']``.

    Between two layers a CPU streams megabytes of weights, so each of a decoding step's small operations
    starts from a cold cache and costs far more than its arithmetic: what counts is how many there are.
    So the scale goes into ``elu`` (``elu(x·s)`` is ``elu`` with ``scale = input_scale = s``, ``alpha = 1/s``),
    the bias into the product, and the product lands in ``output`` itself when each row has its own memory
    or the batch is one row; one memory shared by several rows takes one more, the addition. The memory is
    read per key/value group, as trained, never repeated per query head."""
    batch, heads, _, head_dim = query.shape
    groups = memory.shape[1]
    per_group = heads // groups
    per_row = memory.shape[0] > 1 or batch == 1  # then the products run over (row, group): output's own layout
    key = (per_row, batch, heads, groups, head_dim, query.dtype, query.device)
    if key not in scratch:
        shape = (batch * groups, per_group, head_dim + 1) if per_row else (groups, batch * per_group, head_dim + 1)
        scratch[key] = torch.ones(shape, dtype=query.dtype, device=query.device)
    features = scratch[key]
    phi = features[..., :-1].view(batch, groups, per_group, head_dim) if per_row else \
        features[..., :-1].view(groups, batch, per_group, head_dim).transpose(0, 1)
    torch.ops.aten.elu.out(query.reshape(batch, groups, per_group, head_dim), 1 / scaling, scaling, scaling, out=phi)
    if per_row:
        output.view(batch * groups, per_group, head_dim).baddbmm_(features, memory.flatten(0, 1))
    else:
        term = torch.bmm(features, memory[0]).view(groups, batch, per_group, head_dim)
        output.view(batch, groups, per_group, head_dim).add_(term.transpose(0, 1))
    return output


def memory_term(query: torch.Tensor, memory: torch.Tensor, scaling: float) -> torch.Tensor:
    """``φ(q)ᵀ M`` for every query head, in the attention output's layout ``[B, T, heads, head_dim]``.

    With ``φ(q) = (elu(q · scaling) + 1) / head_dim``, ``φ(q)ᵀ M = elu(q · scaling)ᵀ M' + 1ᵀ M'`` where
    ``M' = M / head_dim``: the constant part is the column sums of ``M'`` (:func:`folded`), the bias of the
    batched products, so the only work on the queries' size is one scale, one ``elu`` in place and the
    products. Two ways to lay out the products give the same numbers and suit different sizes
    (:data:`PER_HEAD_ROWS`): over long inputs, a product per head on strided views of the features
    (no copy of the queries or of their gradients, one ``stack`` for the result); over few rows
    (short inputs), one product per key/value group, whose regrouping copies are small and whose
    operations are as many as the groups, not the heads. A decoding step without gradients takes
    :func:`add_memory_term`'s shorter way.

    Args:
        query: ``[B, heads, T, head_dim]``, as the attention function receives it.
        memory: ``[B | 1, kv_heads, head_dim + 1, head_dim]``: each row's :func:`folded` memory at this
            site (zeros for a row without one; one for every row in training); a query head reads the
            memory of its key/value group.
        scaling: The attention's own score scale (``1 / sqrt(head_dim)`` for most models).
    """
    batch, heads, length, _ = query.shape
    phi = nn.functional.elu(query.transpose(1, 2) * scaling, inplace=True)  # [B, T, heads, head_dim]
    products = _per_head if batch * length >= PER_HEAD_ROWS else _per_group
    return products(phi, memory.to(query.dtype))


def _per_head(phi: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """:func:`memory_term`'s products, one per head.

    ``phi``: ``[B, T, heads, d]``; ``memory``: ``[B | 1, kv_heads, d + 1, d]`` (weight rows, then the bias)."""
    per_group = phi.shape[2] // memory.shape[1]
    memory = memory.expand(phi.shape[0], -1, -1, -1)
    weight, bias = memory[..., :-1, :], memory[..., -1:, :]
    terms = [torch.baddbmm(bias[:, h // per_group], rows, weight[:, h // per_group])
             for h, rows in enumerate(phi.unbind(2))]  # [B, T, d] each, read in place
    return torch.stack(terms, dim=2)


def _per_group(phi: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """:func:`memory_term`'s products, one per key/value group over its tokens and query heads (and over the
    batch's rows too when they share one memory, as in generation with one prefix)."""
    batch, length, heads, head_dim = phi.shape
    groups = memory.shape[1]
    weight, bias = memory[..., :-1, :], memory[..., -1:, :]
    if memory.shape[0] == 1:  # [kv_heads, B * T * per_group, d] through [kv_heads, d, d]
        rows = phi.reshape(batch * length, groups, -1, head_dim).transpose(0, 1).reshape(groups, -1, head_dim)
        term = torch.baddbmm(bias[0], rows, weight[0]).view(groups, batch, length, -1, head_dim)
        return term.permute(1, 2, 0, 3, 4).reshape(batch, length, heads, head_dim)
    rows = phi.reshape(batch, length, groups, -1, head_dim).transpose(1, 2)  # [B, kv_heads, T, per_group, d]
    term = torch.baddbmm(bias.flatten(0, 1), rows.reshape(batch * groups, -1, head_dim), weight.flatten(0, 1))
    return term.view(batch, groups, length, -1, head_dim).transpose(1, 2).reshape(batch, length, heads, head_dim)
