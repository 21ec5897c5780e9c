"""Training-step time of prefix tuning on the bundled model: prefixtune vs PEFT vs the floor.

Run from the repository root:

    python -m benchmarks.train_step --seq-len 128 512 --repeats 5

One step is forward + backward on a random token batch of the bundled SmolLM2-135M-Instruct
(float32); the arms are those of ``benchmarks/arms.py`` (``--arms``; by default ``floor``,
``prefixtune``, ``prefixtune_logits`` and ``peft``). ``--padded`` right-pads every other row
after 3/4 of its length, as batches of real text are. Each arm has its own model instance.
Arms are interleaved (each repeat runs every arm once, rotating the order) and on the same
batch; the table shows median seconds/step, the median of the per-repeat ratios to the floor,
and the attention routes each prefixed arm took; then paired ratios between arms (``RATIOS``), each
with its 95 % bootstrap interval over the repeats. ``--json PATH`` writes the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from prefixtune.base_models import load_model

from . import arms as arm_defs
from .common import (first_line, interval_text, paired_ratio, print_arm_rows, random_tokens, ratio_interval, ratio_text,
                     rotated, settings, start, write_json)

DEFAULT_ARMS = ("floor", "prefixtune", "prefixtune_logits", "peft")
RATIOS = (("prefixtune", "peft"), ("prefixtune_gc", "prefixtune"), ("prefixtune", "prefixtune_pad"),
          ("prefixtune", "prefixtune_grouped"), ("prefixtune", "prefixtune_mask"),
          ("prefixtune", "prefixtune_keep_mask"), ("floor_cache", "floor"), ("prefixtune_memory", "prefixtune"))
"""The paired ratios printed and recorded besides each arm's ratio to the floor, where both arms ran."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128], help="one or more sequence lengths")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prefix-length", type=int, default=arm_defs.PREFIX_LENGTH,
                        help="prefix length of every prefix arm")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per arm and sequence length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm and sequence length")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cpu count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--padded", action="store_true",
                        help="right-pad every other row after 3/4 of its length (a masked batch, as real text gives)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--arms", nargs="+", choices=arm_defs.NAMES, default=list(DEFAULT_ARMS),
                        help="arms to run (default: %(default)s; see benchmarks/arms.py)")
    parser.add_argument("--second-floor", action="store_true",
                        help="add an arm floor_b: the floor on a second model instance, to see how far identical "
                        "arms land apart")
    return parser.parse_args(argv)


def build_arms(wanted, second_floor: bool = False, prefix_length: int = arm_defs.PREFIX_LENGTH,
               new_model=lambda: load_model()[0]) -> tuple[dict, dict]:
    """``({name: Arm}, {name: error line})``; ``floor_b`` is a second ``floor``."""
    arms, failed = arm_defs.build_all(wanted, new_model, prefix_length)
    if second_floor:
        arms["floor_b"] = arm_defs.build("floor", new_model())
    return arms, failed


def make_batch(seed: int, batch_size: int, seq_len: int, vocab_size: int, padded: bool = False):
    """Random tokens and their :func:`arms.padding_mask`."""
    ids = random_tokens(vocab_size, batch_size, seq_len, seed)
    return ids, arm_defs.padding_mask(ids, padded)


def timed_step(arm, ids, mask) -> float:
    begin = time.perf_counter()
    arm.step(ids, mask)
    return time.perf_counter() - begin


def run_interleaved(arms: dict, failed: dict, ids, mask, repeats: int, warmup: int, timer=timed_step) -> dict:
    """Per-arm lists of step seconds (``timer(arm, ids, mask)``); an arm that raises moves to ``failed``."""
    times = {name: [] for name in arms}
    for i in range(warmup + repeats):
        for name in rotated(list(arms), i):
            if name in failed:
                continue
            try:
                seconds = timer(arms[name], ids, mask)
            except Exception as error:  # noqa: BLE001 - one failing arm must not stop the others
                failed[name] = first_line(error)
                continue
            if i >= warmup:
                times[name].append(seconds)
    return {name: t for name, t in times.items() if name not in failed}


def routes(arms: dict, ids, mask) -> dict:
    """``{arm: routes}`` of the prefixed arms on this batch (``benchmarks/arms.py``, ``Arm.routes``)."""
    found = {}
    for name, arm in arms.items():
        try:
            found[name] = arm.routes(ids, mask)
        except Exception as error:  # noqa: BLE001 - the timing loop reports a failing arm
            found[name] = first_line(error)
    return found


def summarize(times: dict, failed: dict, taken: dict) -> dict:
    rows = {}
    for name in [*arm_defs.NAMES, "floor_b"]:
        if name in times:
            rows[name] = {"median_s": statistics.median(times[name]), "vs_floor": paired_ratio(times, name, "floor"),
                          "routes": taken.get(name), "times_s": times[name]}
        elif name in failed:
            rows[name] = {"error": failed[name]}
    return {"arms": rows, "ratios": {f"{top}/{bottom}": paired_ratio(times, top, bottom) for top, bottom in RATIOS},
            "ratios_95": {f"{top}/{bottom}": ratio_interval(times, top, bottom) for top, bottom in RATIOS}}


def print_table(seq_len: int, batch_size: int, summary: dict) -> None:
    print(f"\nseq_len={seq_len}  batch={batch_size}")
    print(f"{'arm':<22}{'median s/step':>15}{'vs floor':>10}  routes")
    print_arm_rows(summary["arms"], 22, lambda row: f"{row['median_s']:>15.3f}{ratio_text(row['vs_floor']):>10}  "
                                                    f"{','.join(row['routes'] or ['-'])}")
    for label, ratio in summary["ratios"].items():
        if ratio is not None:
            print(f"{label}: {ratio:.3f}x (95% interval {interval_text(summary['ratios_95'][label])})")
    print(flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = start(__file__, argv, args.threads)
    print(f"warmup={args.warmup} repeats={args.repeats} prefix_length={args.prefix_length} hidden={arm_defs.HIDDEN}")
    arms, failed = build_arms(args.arms, args.second_floor, args.prefix_length)
    if not arms:
        raise SystemExit(f"every arm failed: {failed}")
    vocab_size = next(iter(arms.values())).module.config.vocab_size
    results.update(args=settings(args), seq_len={})
    for seq_len in args.seq_len:
        ids, mask = make_batch(args.seed, args.batch_size, seq_len, vocab_size, args.padded)
        taken = routes(arms, ids, mask)
        times = run_interleaved(arms, failed, ids, mask, args.repeats, args.warmup)
        summary = summarize(times, failed, taken)
        print_table(seq_len, args.batch_size, summary)
        results["seq_len"][str(seq_len)] = summary
        write_json(args.json, results)  # after every length, so a long run keeps what it has measured
    if args.json:
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
