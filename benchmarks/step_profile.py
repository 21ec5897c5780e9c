"""Where a training step's time goes, the floor against prefixtune: torch.profiler op totals.

Run from the repository root:

    python -m benchmarks.step_profile --seq-len 128 --steps 6

``benchmarks.train_step`` says how much longer prefixtune's step is than the floor; this says
which ops the difference is made of. The arms are ``floor`` and ``prefixtune`` of
``benchmarks/arms.py`` (``--arms`` picks two others), each on its own instance of the bundled
model and the same random batch. Each step is profiled on its own, the arms alternating; per
op, the table shows the median over the steps of its self CPU time, so one slow step (this
machine is shared) moves it less than a sum would.

Ops that only one arm runs, or runs a different number of times, are the prefix's cost (the
attention kernel on more rows, the concatenations, the MLP); small differences in ops both arms
run equally often (``aten::mm``) are the machine's step-to-step spread.

``--by-shape aten::mm`` splits that op by input shapes (which product is the LM head's, which a
layer's), and ``--chunk-elements N`` sets ``prefixtune.lm_loss.CHUNK_ELEMENTS`` for the run:
at 8 x 128 tokens ``16777216`` (64 MiB) makes four chunks of 256 rows, ``33554432`` two of 512.
``--json PATH`` writes every op's medians.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
from pathlib import Path

from prefixtune import lm_loss
from prefixtune.base_models import load_model

from .arms import NAMES, build_all
from .common import chunk_elements, settings, start, write_json
from .profiling import as_json, op_times, print_op_table
from .train_step import make_batch


def profile_steps(arms: dict, ids, mask, steps: int, by_shape: str | None = None) -> dict:
    """``{arm: ({op: median ms}, {op: calls per step})}`` over ``steps`` alternating profiled steps."""
    samples = {name: collections.defaultdict(list) for name in arms}
    counts = {name: collections.Counter() for name in arms}
    for i in range(steps + 1):  # step 0 of each arm warms up, unprofiled
        for name in (list(arms) if i % 2 else list(arms)[::-1]):
            if i == 0:
                arms[name].step(ids, mask)
                continue
            times, calls = op_times(lambda arm=arms[name]: arm.step(ids, mask), by_shape)
            for op, ms in times.items():
                samples[name][op].append(ms)
            if i == 1:
                counts[name].update(calls)
    return {name: ({op: statistics.median(v + [0.0] * (steps - len(v))) for op, v in samples[name].items()},
                   counts[name]) for name in arms}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="profiled steps per arm (after one warm-up each)")
    parser.add_argument("--arms", nargs=2, choices=NAMES, default=["floor", "prefixtune"],
                        help="the two arms compared (default: %(default)s)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--by-shape", metavar="OP", help="split this op by input shapes, e.g. aten::mm")
    parser.add_argument("--chunk-elements", type=int, help="prefixtune.lm_loss.CHUNK_ELEMENTS for this run "
                        f"(default {lm_loss.CHUNK_ELEMENTS})")
    parser.add_argument("--json", type=Path, help="also write every op's medians here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    header = start(__file__, argv, args.threads)
    arms, failed = build_all(args.arms, lambda: load_model()[0])
    if failed:
        raise SystemExit(f"arms failed to build: {failed}")
    ids, mask = make_batch(0, args.batch_size, args.seq_len, arms[args.arms[0]].module.config.vocab_size)
    with chunk_elements(args.chunk_elements):
        results = profile_steps(arms, ids, mask, args.steps, args.by_shape)
        print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} profiled steps per arm, "
              f"{args.threads} threads, loss chunks of at most {lm_loss.CHUNK_ELEMENTS} logits; medians per step")
    print_op_table(results, args.top, 90 if args.by_shape else 50)
    write_json(args.json, {**header, "args": settings(args), "arms": as_json(results)})


if __name__ == "__main__":
    main()
