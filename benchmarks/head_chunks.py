"""What one chunk of the chunked loss costs per row: the LM head's two products at several chunk sizes.

Run from the repository root:

    python -m benchmarks.head_chunks --rows 1024 512 384 341 320 256 128

``prefixtune/lm_loss.py`` computes the loss a chunk of rows at a time. Each chunk runs the head
forward (``[rows, hidden] x [hidden, vocabulary]``) and the hidden states' gradient
(``[rows, vocabulary] x [vocabulary, hidden]``), and each reads the whole head weight (113 MB for
the bundled SmolLM2's 49,152 x 576 float32 head) again, so small chunks cost more per row. This
times both products alone on random data of the bundled model's shape, the row counts
interleaved, and prints the median per-row cost relative to the largest row count: what
``CHUNK_ELEMENTS`` trades against memory. ``--json PATH`` writes the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from .common import settings, start, write_json


def timed(fn) -> float:
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 512, 384, 341, 320, 256, 128])
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (default: the bundled SmolLM2-135M's)")
    parser.add_argument("--vocabulary", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="also write the table here")
    return parser.parse_args(argv)


def per_row_seconds(rows_list: list[int], hidden: int, vocabulary: int, repeats: int) -> dict:
    """``{rows: [forward s/row, gradient s/row]}``: medians over ``repeats`` interleaved rounds."""
    weight = torch.randn(vocabulary, hidden)
    times = {rows: ([], []) for rows in rows_list}
    for round_ in range(repeats + 1):  # round 0 warms up
        for rows in rows_list:
            hidden_states, grad = torch.randn(rows, hidden), torch.randn(rows, vocabulary)
            forward = timed(lambda x=hidden_states: torch.nn.functional.linear(x, weight))
            backward = timed(lambda g=grad: g @ weight)
            if round_:
                times[rows][0].append(forward)
                times[rows][1].append(backward)
    return {rows: [statistics.median(t) / rows for t in pair] for rows, pair in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    results = start(__file__, argv, args.threads)
    per_row = per_row_seconds(args.rows, args.hidden, args.vocabulary, args.repeats)
    top = per_row[max(args.rows)]
    print(f"head {args.vocabulary} x {args.hidden}, float32, {args.threads} threads, median of {args.repeats} rounds")
    print(f"{'rows':>6} {'forward ms':>11} {'per row':>8} {'gradient ms':>12} {'per row':>8}")
    table = {}
    for rows, (forward, backward) in per_row.items():
        table[rows] = {"forward_ms": forward * rows * 1e3, "forward_per_row_vs_largest": forward / top[0],
                       "gradient_ms": backward * rows * 1e3, "gradient_per_row_vs_largest": backward / top[1]}
        print(f"{rows:6d} {forward * rows * 1e3:11.1f} {forward / top[0]:7.2f}x {backward * rows * 1e3:12.1f} "
              f"{backward / top[1]:7.2f}x")
    write_json(args.json, {**results, "args": settings(args), "rows": table})


if __name__ == "__main__":
    main()
