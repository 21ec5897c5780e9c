"""SDPA alone, forward + backward, with one layer's shapes of the bundled model: what a prefix
costs the attention kernel itself on this machine.

Run from the repository root:

    .venv/bin/python benchmarks/attention_kernel.py --seq-lens 128 512
    .venv/bin/python benchmarks/attention_kernel.py --seq-lens 256 --prefix 10 50 100 200 256
    python3 benchmarks/attention_kernel.py --device cuda --dtype bfloat16 --batch 32 \
        --seq-lens 128 512 2048 --prefix 10 100 200 --modes pad mask     # on a GPU

Shapes: batch 8 (``--batch``), 9 query heads, 3 key/value heads (grouped-query attention), head
size 64, float32 (``--dtype``), random values, on the CPU (``--device``; on CUDA each step ends
with a synchronize). Arms, interleaved (25 rounds, the first 3 dropped, median):

* ``plain``: ``T`` queries over ``T`` keys, ``is_causal=True`` (what the frozen model runs);
* ``pad``: what prefixtune runs by default (``FUSED_CAUSAL = "pad"``): ``L_p`` prefix keys in
  front (``--prefix``, 10 by default), ``L_p`` zero query rows in front so that ``is_causal``
  lines up, their outputs dropped;
* ``bias``: ``FUSED_CAUSAL = "bias"``: the ``T`` queries over ``L_p + T`` keys with torch's
  bottom-right causal bias (the key/values repeated per query head, as transformers does
  whenever a mask is given);
* ``bias_gqa``: ``FUSED_CAUSAL = "bias_gqa"``: the bias with ``enable_gqa=True``, key/values not
  repeated (on the CPU torch turns the bias into a mask);
* ``mask``: ``FUSED_CAUSAL = "mask"``, the path for calls where ``pad`` would more than double
  the queries: an explicit boolean bottom-right mask ``[1, 1, T, L_p + T]``, key/values repeated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.nn.attention.bias import causal_lower_right
from torch.nn.functional import scaled_dot_product_attention as sdpa

BATCH, HEADS, KV_HEADS, HEAD_DIM, PREFIX = 8, 9, 3, 64, 10


def arm(seq_len: int, prefix: int, mode: str, batch: int = BATCH, **where):
    """One forward + backward of ``mode``; ``where``: ``device`` and ``dtype`` of the tensors."""
    q = torch.randn(batch, HEADS, seq_len, HEAD_DIM, **where).requires_grad_(True)
    k = torch.randn(batch, KV_HEADS, seq_len + prefix, HEAD_DIM, **where).requires_grad_(True)
    v = torch.randn(batch, KV_HEADS, seq_len + prefix, HEAD_DIM, **where).requires_grad_(True)
    groups = HEADS // KV_HEADS
    rows = torch.arange(seq_len, device=q.device)[:, None] + prefix
    mask = (torch.arange(seq_len + prefix, device=q.device)[None, :] <= rows)[None, None]

    def step():
        if mode == "plain":
            out = sdpa(q, k, v, is_causal=True, enable_gqa=True)
        elif mode == "pad":
            padded = torch.cat([q.new_zeros(batch, HEADS, prefix, HEAD_DIM), q], dim=2)
            out = sdpa(padded, k, v, is_causal=True, enable_gqa=True)[:, :, prefix:]
        elif mode == "bias":
            out = sdpa(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                       attn_mask=causal_lower_right(seq_len, seq_len + prefix))
        elif mode == "bias_gqa":
            out = sdpa(q, k, v, attn_mask=causal_lower_right(seq_len, seq_len + prefix), enable_gqa=True)
        else:
            out = sdpa(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), attn_mask=mask)
        out.sum().backward()
        if q.is_cuda:
            torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--prefix", type=int, nargs="+", default=[PREFIX], help="prefix lengths L_p")
    parser.add_argument("--modes", nargs="+", default=["pad", "bias", "mask"], choices=["pad", "bias", "bias_gqa", "mask"])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = {"batch": args.batch, "device": torch.device(args.device), "dtype": getattr(torch, args.dtype)}
    for seq_len, prefix in ((t, p) for t in args.seq_lens for p in args.prefix):
        arms = {"plain": arm(seq_len, 0, "plain", **where),
                **{mode: arm(seq_len, prefix, mode, **where) for mode in args.modes}}
        times = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, step in arms.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t[3:]) * 1e3 for name, t in times.items()}
        print(f"seq_len={seq_len} prefix={prefix}: " + "  ".join(f"{name} {value:.2f} ms ({value / ms['plain']:.2f}x)"
                                                 for name, value in ms.items()))


if __name__ == "__main__":
    main()
