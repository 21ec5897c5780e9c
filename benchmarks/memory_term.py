"""The memory prefix's term in its two layouts (``prefixtune.memory.PER_HEAD_ROWS``): per head and per key/value group.

Times :func:`prefixtune.memory.memory_term` with the products per head and per group on SmolLM2-135M's shapes
(9 query heads, 3 key/value groups, head size 64), from one decoding token to a training batch, forward
alone (decoding) and forward + backward with the attention output added (training); the two layouts
interleaved, medians. The crossover is where ``PER_HEAD_ROWS`` sits. Run from the repository root::

    python -m benchmarks.memory_term --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prefixtune import memory

SHAPES = ((1, 1), (8, 1), (1, 32), (8, 32), (8, 64), (8, 128), (8, 512))
"""(batch, length) pairs: query rows = batch x length."""
HEADS, GROUPS, HEAD_DIM = 9, 3, 64


def timed(rows_threshold: int, query: torch.Tensor, folded: torch.Tensor, backward: bool) -> float:
    memory.PER_HEAD_ROWS = rows_threshold
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        term = memory.memory_term(query, folded, HEAD_DIM ** -0.5)
        if backward:
            (term + 1.0).sum().backward()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{'batch x length':>15} {'pass':>9} {'per group':>11} {'per head':>10} {'head / group':>13}")
    for batch, length in SHAPES:
        for backward in (False, True):
            query = torch.randn(batch, length, HEADS, HEAD_DIM).transpose(1, 2).requires_grad_(backward)
            folded = memory.folded(torch.randn(1, GROUPS, HEAD_DIM, HEAD_DIM)).requires_grad_(backward)
            times = {"group": [], "head": []}
            for _ in range(args.repeats):  # interleaved
                times["group"].append(timed(10**12, query, folded, backward))
                times["head"].append(timed(0, query, folded, backward))
            group, head = statistics.median(times["group"]), statistics.median(times["head"])
            print(f"{batch:>7} x {length:<5} {'fwd+bwd' if backward else 'fwd':>9} {group * 1e6:>9.0f}us "
                  f"{head * 1e6:>8.0f}us {head / group:>12.2f}x")


if __name__ == "__main__":
    main()
