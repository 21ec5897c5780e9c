"""SDPA alone, forward + backward, with one layer's shapes of the bundled model: what a prefix
costs the attention kernel itself on this machine.

Run from the repository root:

    python -m benchmarks.attention_kernel --seq-lens 128 512
    python -m benchmarks.attention_kernel --seq-lens 256 --prefix 10 50 100 200 256
    python -m benchmarks.attention_kernel --device cuda --dtype bfloat16 --batch 32 \
        --seq-lens 128 512 2048 --prefix 10 100 200 --modes pad mask     # on a GPU

Shapes: batch 8 (``--batch``), 9 query heads, 3 key/value heads (grouped-query attention), head
size 64, float32 (``--dtype``), random values, on the CPU (``--device``; on CUDA each step ends
with a synchronize). The modes call torch's SDPA directly, without the library, as its attention
routes (``prefixtune/attention.py``) call it; ``L_p`` prefix keys in front (``--prefix``, 10 by
default) of ``T`` keys, ``T`` queries. Arms, interleaved (25 rounds, the order rotating each round,
the first 3 dropped, median):

* ``plain``: ``T`` queries over ``T`` keys, ``is_causal=True`` (what the frozen model runs);
* ``pad``: the ``pad`` route: ``L_p`` zero query rows in front so that ``is_causal`` lines up,
  grouped key/values read as they are, the padded rows' outputs dropped;
* ``grouped``: the ``grouped`` route of a batch without padding: torch's bottom-right
  ``causal_lower_right`` bias with ``enable_gqa=True``, key/values not repeated (on the CPU
  torch turns the bias into a mask);
* ``mask``: the ``stock`` route (transformers' kernel given a mask): an explicit boolean
  bottom-right mask ``[1, 1, T, L_p + T]``, key/values repeated per query head;
* ``bias``: the bottom-right bias with the key/values repeated per query head (no library
  route takes it: the cost of the repeat on its own);
* ``pad_stock``: ``pad`` laid out as transformers' kernel lays it out: all ``L_p + T`` output
  rows as ``[B, S, heads, head_dim]`` before the padded ones are dropped, then the kept rows
  copied again to flatten the heads. Only meaningful with ``--layout``.

``--layout`` adds what follows the kernel in the model to every arm: the output laid out as
``[B, T, heads * head_dim]`` for the output projection (``transpose(1, 2).contiguous()``, then
``reshape``), and its backward with a dense gradient; the inputs are then laid out in memory as
the model's projections make them (``[B, T, heads, head_dim]``). Without it the arms stop at the
kernel's output. ``--json PATH`` writes the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention as sdpa

from .common import rotated, settings, start, write_json

BATCH, HEADS, KV_HEADS, HEAD_DIM, PREFIX = 8, 9, 3, 64, 10
MODES = ("pad", "grouped", "mask", "bias", "pad_stock")


def _leaf(batch: int, heads: int, length: int, layout: bool, where: dict) -> torch.Tensor:
    """``[batch, heads, length, HEAD_DIM]``; with ``layout`` stored as the model's projections
    make it (``[batch, length, heads, HEAD_DIM]``, transposed), else contiguous."""
    if not layout:
        return torch.randn(batch, heads, length, HEAD_DIM, **where).requires_grad_(True)
    return torch.randn(batch, length, heads, HEAD_DIM, **where).transpose(1, 2).detach().requires_grad_(True)


def arm(seq_len: int, prefix: int, mode: str, batch: int = BATCH, layout: bool = False, **where):
    """One forward + backward of ``mode``; ``where``: ``device`` and ``dtype`` of the tensors."""
    q, k, v = (_leaf(batch, heads, length, layout, where)
               for heads, length in ((HEADS, seq_len), (KV_HEADS, seq_len + prefix), (KV_HEADS, seq_len + prefix)))
    groups = HEADS // KV_HEADS
    rows = torch.arange(seq_len, device=q.device)[:, None] + prefix
    mask = (torch.arange(seq_len + prefix, device=q.device)[None, :] <= rows)[None, None]
    grad = torch.randn(batch, seq_len, HEADS * HEAD_DIM, **where) if layout else None

    def step():
        if mode == "plain":
            out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        elif mode in ("pad", "pad_stock"):
            padded = torch.cat([q.new_zeros(batch, HEADS, prefix, HEAD_DIM), q], dim=2)
            out = sdpa(padded, k, v, is_causal=True, enable_gqa=True)
            if mode == "pad_stock" and layout:  # transformers' kernel lays out all rows, the model drops some
                out = out.transpose(1, 2).contiguous()[:, prefix:].transpose(1, 2)
            else:  # rows dropped in the pad route's order (prefixtune/attention.py, _grouped_sdpa)
                out = out.transpose(1, 2)[:, prefix:].transpose(1, 2)
        elif mode == "bias":
            out = sdpa(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                       attn_mask=causal_lower_right(seq_len, seq_len + prefix))
        elif mode == "grouped":
            out = sdpa(q, k, v, attn_mask=causal_lower_right(seq_len, seq_len + prefix), enable_gqa=True)
        else:
            out = sdpa(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)
        if layout:  # and a dense gradient, as the output projection's backward sends
            out = out.transpose(1, 2).contiguous().reshape(batch, seq_len, HEADS * HEAD_DIM)
            out.backward(grad)
        else:
            out.sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize()

    return step


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--prefix", type=int, nargs="+", default=[PREFIX], help="prefix lengths L_p")
    parser.add_argument("--modes", nargs="+", default=["pad", "bias", "mask"], choices=MODES)
    parser.add_argument("--layout", action="store_true",
                        help="add the output's layout for the output projection, forward and backward, to every arm")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, help="also write the medians here")
    return parser.parse_args(argv)


def time_arms(arms: dict, rounds: int) -> dict:
    """Median ms per arm over ``rounds`` interleaved rounds, the first 3 dropped (warm-up)."""
    times = {name: [] for name in arms}
    for round_ in range(rounds):
        for name in rotated(list(arms), round_):
            begin = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    results = start(__file__, argv, args.threads)
    results.update(args=settings(args), ms={})
    where = {"batch": args.batch, "layout": args.layout, "device": torch.device(args.device),
             "dtype": getattr(torch, args.dtype)}
    for seq_len, prefix in ((t, p) for t in args.seq_lens for p in args.prefix):
        arms = {"plain": arm(seq_len, 0, "plain", **where),
                **{mode: arm(seq_len, prefix, mode, **where) for mode in args.modes}}
        ms = time_arms(arms, args.rounds)
        results["ms"][f"seq_len={seq_len} prefix={prefix}"] = ms
        print(f"seq_len={seq_len} prefix={prefix}: " + "  ".join(f"{name} {value:.2f} ms ({value / ms['plain']:.2f}x)"
                                                 for name, value in ms.items()), flush=True)
        write_json(args.json, results)


if __name__ == "__main__":
    main()
