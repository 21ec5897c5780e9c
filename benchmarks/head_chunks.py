"""What one chunk of the chunked loss costs per row: the LM head's two products at several chunk sizes.

Run from the repository root:

    .venv/bin/python benchmarks/head_chunks.py --rows 1024 512 384 341 320 256 128

``prefixtune/lm_loss.py`` computes the loss a chunk of rows at a time. Each chunk runs the head
forward (``[rows, hidden] x [hidden, vocabulary]``) and the hidden states' gradient
(``[rows, vocabulary] x [vocabulary, hidden]``), and each reads the whole head weight (113 MB for
the bundled SmolLM2's 49,152 x 576 float32 head) again, so small chunks cost more per row. This
times both products alone on random data of the bundled model's shape, the row counts
interleaved, and prints the median per-row cost relative to the largest row count: what
``CHUNK_ELEMENTS`` trades against memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 512, 384, 341, 320, 256, 128])
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (default: the bundled SmolLM2-135M's)")
    parser.add_argument("--vocabulary", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weight = torch.randn(args.vocabulary, args.hidden)
    times = {rows: ([], []) for rows in args.rows}
    for round_ in range(args.repeats + 1):
        for rows in args.rows:
            hidden, grad = torch.randn(rows, args.hidden), torch.randn(rows, args.vocabulary)
            forward = timed(lambda: torch.nn.functional.linear(hidden, weight))
            backward = timed(lambda: grad @ weight)
            if round_:
                times[rows][0].append(forward)
                times[rows][1].append(backward)
    per_row = {rows: [statistics.median(t) / rows for t in pair] for rows, pair in times.items()}
    top = per_row[max(args.rows)]
    print(f"head {args.vocabulary} x {args.hidden}, float32, {args.threads} threads, median of {args.repeats} rounds")
    print(f"{'rows':>6} {'forward ms':>11} {'per row':>8} {'gradient ms':>12} {'per row':>8}")
    for rows, (forward, backward) in per_row.items():
        print(f"{rows:6d} {forward * rows * 1e3:11.1f} {forward / top[0]:7.2f}x {backward * rows * 1e3:12.1f} "
              f"{backward / top[1]:7.2f}x")


if __name__ == "__main__":
    main()
