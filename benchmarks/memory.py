"""Peak memory of one training step on a CPU: prefixtune (with and without gradient
checkpointing, with and without the chunked loss) against PEFT's prefix tuning and the floor.

Run from the repository root:

    python -m benchmarks.memory --seq-lens 512 1024 2048 --tokens 4096 --json /tmp/bench/memory.json

Each arm and length runs in a fresh Python process, one after another (rotating the order per
length), on a random-weight Llama of the bundled SmolLM2-135M's shape (``benchmarks/shapes.py``;
float32, 30 layers, vocabulary 49,152; memory does not depend on the weight values), batch
``tokens / length``, no padding. The process builds the model, gives freed heap back to the
system (``malloc_trim``), then runs one step (forward + backward, ``labels = input_ids``) while a
thread samples its resident set size every 2 ms: the **peak above the resident size before the
step** is what the step needed beyond the weights. ``--timed N`` more steps give seconds per step
(noisy on a shared machine: compare times with ``benchmarks.train_step``, which interleaves the arms).

The arms (``--arms``) are those of ``benchmarks/arms.py``; by default ``floor``, ``peft``,
``prefixtune_logits``, ``prefixtune``, ``prefixtune_gc_logits``, ``prefixtune_gc``,
``prefixtune_pad`` and ``prefixtune_mask``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from prefixtune.compare.runner import PeakMemory

from .arms import NAMES, build
from .common import ROOT, rotated, settings, start, write_json
from .shapes import random_model

DEFAULT_ARMS = ("floor", "peft", "prefixtune_logits", "prefixtune", "prefixtune_gc_logits", "prefixtune_gc",
                "prefixtune_pad", "prefixtune_mask")


def worker(arm: str, seq_len: int, batch: int, timed: int) -> dict:
    torch.manual_seed(0)
    step = build(arm, random_model("smollm2-135m")).step
    ids = torch.randint(3, 49152, (batch, seq_len))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with PeakMemory(torch.device("cpu"), every=0.002) as sampler:  # resident size sampled every 2 ms
        step(ids)
    resident = sampler.baseline
    times = []
    for _ in range(timed):
        begin = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - begin)
    return {"arm": arm, "seq_len": seq_len, "batch": batch, "resident_mib": resident / 2**20,
            "step_peak_mib": (sampler.peak - resident) / 2**20, "times_s": times}


def run_arm(arm: str, seq_len: int, batch: int, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--worker", arm, str(seq_len), str(batch),
               "--timed", str(args.timed), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"arm": arm, "seq_len": seq_len, "batch": batch, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(seq_len: int, rows: dict) -> None:
    peft = rows.get("peft", {}).get("step_peak_mib")
    print(f"\nseq_len={seq_len}  batch={next(iter(rows.values()))['batch']}")
    print(f"{'arm':22s} {'step peak MiB':>13s} {'vs peft':>8s} {'resident MiB':>12s} {'s/step':>8s}")
    for arm, row in rows.items():
        if "error" in row:
            print(f"{arm:22s} failed: {row['error']}")
            continue
        ratio = f"{row['step_peak_mib'] / peft:.2f}x" if peft else "-"
        seconds = f"{statistics.median(row['times_s']):.2f}" if row["times_s"] else "-"
        print(f"{arm:22s} {row['step_peak_mib']:13.0f} {ratio:>8s} {row['resident_mib']:12.0f} {seconds:>8s}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (batch = tokens / length)")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=NAMES)
    parser.add_argument("--timed", type=int, default=1, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        torch.set_num_threads(args.threads)
        arm, seq_len, batch = args.worker
        print(json.dumps(worker(arm, int(seq_len), int(batch), args.timed)))
        return
    results = start(__file__, argv, args.threads)
    results.update(args=settings(args), results={})
    for index, seq_len in enumerate(args.seq_lens):
        batch = max(1, args.tokens // seq_len)
        rows = {arm: run_arm(arm, seq_len, batch, args) for arm in rotated(args.arms, index)}
        results["results"][seq_len] = {arm: rows[arm] for arm in args.arms}
        print_table(seq_len, results["results"][seq_len])
        write_json(args.json, results)


if __name__ == "__main__":
    main()
