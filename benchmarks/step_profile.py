"""Where a training step's time goes, the floor against prefixtune: torch.profiler op totals.

Run from the repository root:

    .venv/bin/python benchmarks/step_profile.py --seq-len 128 --steps 6

``train_step.py`` says how much longer prefixtune's step is than the floor (the frozen model's
forward + backward to its input embeddings); this says which ops the difference is made of. The
arms are train_step.py's ``floor`` and ``prefixtune`` (prefix length 10, MLP width 512, the loss
without the full logits), each on its own model instance and the same random batch. Each step is
profiled on its own, the arms alternating; per op, the table shows the median over the steps of
its self CPU time, so one slow step (this machine is shared) moves it less than a sum would.

Ops that only one arm runs, or runs a different number of times, are the prefix's cost (the
attention kernel on more rows, the concatenations, the MLP); small differences in ops both arms
run equally often (``aten::mm``) are the machine's step-to-step spread.

``--by-shape aten::mm`` splits that op by input shapes (which product is the LM head's, which a
layer's), and ``--chunk-elements N`` sets ``prefixtune.lm_loss.CHUNK_ELEMENTS`` for the run:
at 8 x 128 tokens ``16777216`` (64 MiB) makes four chunks of 256 rows, ``33554432`` two of 512.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_profile import op_times  # noqa: E402  (benchmarks/decode_profile.py)
from train_step import floor_arm, make_batch, prefixtune_arm  # noqa: E402  (benchmarks/train_step.py)

from prefixtune import lm_loss  # noqa: E402


def profile_steps(arms: dict, ids, mask, steps: int, by_shape: str | None = None) -> dict:
    """``{arm: ({op: median ms}, {op: calls per step})}`` over ``steps`` alternating profiled steps."""
    samples = {name: collections.defaultdict(list) for name in arms}
    counts = {name: collections.Counter() for name in arms}
    for i in range(steps + 1):  # step 0 of each arm warms up, untimed
        for name in (list(arms) if i % 2 else list(arms)[::-1]):
            step, module = arms[name]
            module.zero_grad(set_to_none=True)
            if i == 0:
                step(ids, mask)
                continue
            times, calls = op_times(lambda: step(ids, mask), by_shape)
            for op, ms in times.items():
                samples[name][op].append(ms)
            counts[name].update({op: n for op, n in calls.items() if i == 1})
    return {name: ({op: statistics.median(v + [0.0] * (steps - len(v))) for op, v in samples[name].items()},
                   counts[name]) for name in arms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6, help="profiled steps per arm (after one warm-up each)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--by-shape", metavar="OP", help="split this op by input shapes, e.g. aten::mm")
    parser.add_argument("--chunk-elements", type=int, help="prefixtune.lm_loss.CHUNK_ELEMENTS for this run "
                        f"(default {lm_loss.CHUNK_ELEMENTS})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.chunk_elements:
        lm_loss.CHUNK_ELEMENTS = args.chunk_elements
    arms = {"floor": floor_arm(), "prefixtune": prefixtune_arm()}
    ids, mask = make_batch(0, args.batch_size, args.seq_len, arms["floor"][1].config.vocab_size)
    results = profile_steps(arms, ids, mask, args.steps, args.by_shape)
    (ft, fn), (pt, pn) = results["floor"], results["prefixtune"]
    total_f, total_p = sum(ft.values()), sum(pt.values())
    print(f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} profiled steps per arm, "
          f"{args.threads} threads, loss chunks of at most {lm_loss.CHUNK_ELEMENTS} logits; medians per step")
    print(f"floor: {total_f:.0f} ms self CPU time; prefixtune: {total_p:.0f} ms ({total_p / total_f:.3f}x)")
    width = 90 if args.by_shape else 50
    print(f"{'op':{width}s} {'floor ms':>9s} {'prefixtune ms':>13s} {'diff ms':>8s} {'% of floor':>10s} {'calls':>13s}")
    ops = sorted(set(ft) | set(pt), key=lambda k: -abs(pt.get(k, 0) - ft.get(k, 0)))[:args.top]
    for op in ops:
        diff = pt.get(op, 0.0) - ft.get(op, 0.0)
        print(f"{op[:width]:{width}s} {ft.get(op, 0):9.1f} {pt.get(op, 0):13.1f} {diff:+8.1f} {100 * diff / total_f:+9.2f}% "
              f"{fn.get(op, 0):6d}/{pn.get(op, 0):<6d}")


if __name__ == "__main__":
    main()
