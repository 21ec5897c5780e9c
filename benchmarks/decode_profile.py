"""Where greedy decoding spends its time, plain model against prefixtune: torch.profiler op totals.

Run from the repository root:

    .venv/bin/python benchmarks/decode_profile.py --batch-size 8 --new-tokens 32

One profiled ``generate`` call per arm (after one unprofiled warm-up call each) on the bundled
SmolLM2-135M-Instruct, random 32-token prompts: ``plain`` (the model's own ``generate``) and
``prefixtune`` (prefix length 10, MLP folded with ``materialize()``). Prints each arm's summed
self CPU time and the ops whose self time differs most between the arms, with their call
counts. One call per arm: read the differences of ops that only one arm runs, or runs a
different number of times (``aten::cat``, the attention kernel), not small differences in
``aten::mm``, which both arms run equally often.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import PrefixConfig, PrefixModel  # noqa: E402
from prefixtune.models import load_model  # noqa: E402


def op_times(call, by_shape: str | None = None) -> tuple[collections.Counter, collections.Counter]:
    """Self CPU ms and call count per op during ``call()``; the op named ``by_shape`` (e.g.
    ``aten::mm``) is split by its input shapes, so that its calls can be told apart."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=bool(by_shape)) as prof:
        call()
    times, counts = collections.Counter(), collections.Counter()
    for event in prof.key_averages(group_by_input_shape=bool(by_shape)):
        key = f"{event.key} {event.input_shapes}" if event.key == by_shape else event.key
        times[key] += event.self_cpu_time_total / 1e3
        counts[key] += event.count
    return times, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = load_model()[0].eval()
    wrapped = PrefixModel.wrap(load_model()[0], PrefixConfig(prefix_length=10, reparam_hidden_size=512)).eval()
    wrapped.materialize()
    ids = torch.randint(3, plain.config.vocab_size, (args.batch_size, 32), generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=2,
              min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens)
    arms = {"plain": lambda: plain.generate(**kw), "prefixtune": lambda: wrapped.generate(**kw)}
    with torch.inference_mode():
        for call in arms.values():
            call()
        results = {name: op_times(call) for name, call in arms.items()}
    for name, (times, _) in results.items():
        print(f"{name}: {sum(times.values()):.0f} ms self CPU time in all")
    (pt, pn), (tt, tn) = results["plain"], results["prefixtune"]
    print(f"{'op':50s} {'plain ms':>9s} {'prefixtune ms':>13s} {'calls':>13s}")
    for key in sorted(set(pt) | set(tt), key=lambda k: -abs(tt[k] - pt[k]))[:args.top]:
        print(f"{key[:50]:50s} {pt[key]:9.1f} {tt[key]:13.1f} {pn[key]:6d}/{tn[key]:<6d}")


if __name__ == "__main__":
    main()
