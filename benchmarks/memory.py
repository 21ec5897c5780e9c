"""Peak memory of one training step on a CPU: prefixtune (with and without gradient
checkpointing, with and without the chunked loss) against PEFT's prefix tuning and the floor.

Run from the repository root:

    .venv/bin/python benchmarks/memory.py --seq-lens 512 1024 2048 --tokens 4096 --json /tmp/bench/memory.json

Each arm and length runs in a fresh Python process, one after another (rotating the order per
length), on a random-weight Llama of the bundled SmolLM2-135M's shape (float32, 30 layers,
vocabulary 49,152; memory does not depend on the weight values), batch ``tokens / length``,
prefix length 10, MLP width 512. The process builds the model, gives freed heap back to the
system (``malloc_trim``), then runs one step (forward + backward, ``labels = input_ids``) while a
thread samples its resident set size every 2 ms: the **peak above the resident size before the
step** is what the step needed beyond the weights. ``--timed N`` more steps give seconds per step
(noisy on a shared machine: compare times with ``train_step.py``, which interleaves the arms).

Arms:

* ``floor``: the frozen model's own forward + backward down to its input embeddings.
* ``peft``: PEFT ``PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=True,
  encoder_hidden_size=512)``; PEFT refuses gradient checkpointing for prefix tuning.
* ``prefixtune_logits``: ``PrefixModel`` called as a transformers model is (``.logits`` built).
* ``prefixtune``: what ``prefixtune train`` runs: ``return_logits=False``, the loss computed
  chunk by chunk without the ``[B, T, vocabulary]`` logits (``prefixtune/lm_loss.py``).
* ``prefixtune_gc_logits`` / ``prefixtune_gc``: the same two with gradient checkpointing.
* ``prefixtune_pad``: ``prefixtune`` with ``FUSED_CAUSAL = "pad"``, the attention path that the
  default ``"auto"`` replaced on short CPU rows (prefixtune/attention.py).
* ``prefixtune_mask``: ``prefixtune`` with ``FUSED_CAUSAL = "mask"`` (key/values repeated per
  query head), what ``"auto"`` took on short CPU rows before ``"bias_gqa"``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, peft_prefix_model, rotated, write_json  # noqa: E402
from scaling import random_model  # noqa: E402

from prefixtune import PrefixConfig, PrefixModel, attention  # noqa: E402
from prefixtune.compare.runner import PeakMemory  # noqa: E402

ARMS = ("floor", "peft", "prefixtune_logits", "prefixtune", "prefixtune_gc_logits", "prefixtune_gc", "prefixtune_pad",
        "prefixtune_mask")


def build(arm: str):
    """``step(ids)`` of ``arm``, on its own freshly built model."""
    model = random_model("smollm2-135m", "cpu", torch.float32).requires_grad_(False).train()
    if arm == "floor":
        embed = model.get_input_embeddings()
        return lambda ids: model(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids,
                                    use_cache=False).loss.backward()
    if arm == "peft":
        wrapped = peft_prefix_model(model, 10, 512).train()
        return lambda ids: wrapped(input_ids=ids, labels=ids).loss.backward()
    wrapped = PrefixModel.wrap(model, PrefixConfig(prefix_length=10, reparam_hidden_size=512)).train()
    if "_gc" in arm:
        wrapped.gradient_checkpointing_enable()
    if arm in ("prefixtune_pad", "prefixtune_mask"):
        attention.FUSED_CAUSAL = arm.split("_")[1]  # this process runs this arm alone
    logits = arm.endswith("_logits")

    def step(ids):
        wrapped.zero_grad(set_to_none=True)
        wrapped(input_ids=ids, labels=ids, return_logits=logits).loss.backward()

    return step


def worker(arm: str, seq_len: int, batch: int, timed: int) -> dict:
    torch.manual_seed(0)
    step = build(arm)
    ids = torch.randint(3, 49152, (batch, seq_len))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with PeakMemory(torch.device("cpu"), every=0.002) as sampler:  # resident size sampled every 2 ms
        step(ids)
    resident = sampler.baseline
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    return {"arm": arm, "seq_len": seq_len, "batch": batch, "resident_mib": resident / 2**20,
            "step_peak_mib": (sampler.peak - resident) / 2**20, "times_s": times}


def run_arm(arm: str, seq_len: int, batch: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", arm, str(seq_len), str(batch), "--timed", str(args.timed),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
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
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--timed", type=int, default=1, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        arm, seq_len, batch = args.worker
        print(json.dumps(worker(arm, int(seq_len), int(batch), args.timed)))
        return
    info = machine_info(args.threads)
    print("  ".join(f"{k}={v}" for k, v in info.items()))
    results = {}
    for index, seq_len in enumerate(args.seq_lens):
        batch = max(1, args.tokens // seq_len)
        rows = {arm: run_arm(arm, seq_len, batch, args) for arm in rotated(args.arms, index)}
        results[seq_len] = {arm: rows[arm] for arm in args.arms}
        print_table(seq_len, results[seq_len])
    if args.json:
        write_json(args.json, {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "json"},
                               "results": results})


if __name__ == "__main__":
    main()
