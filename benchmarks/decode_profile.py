"""Where greedy decoding spends its time, plain model against prefixtune: torch.profiler op totals.

Run from the repository root:

    python -m benchmarks.decode_profile --batch-size 8 --new-tokens 32

One profiled ``generate`` call per arm (after one unprofiled warm-up call each) on the bundled
SmolLM2-135M-Instruct, random 32-token prompts: ``plain`` (the model's own ``generate``) and
``prefixtune`` (the prefix of ``benchmarks/arms.py``, MLP folded with ``materialize()``), or with
``--prefix-kind memory`` the memory prefix of ``benchmarks.generate``'s ``memory`` arm. Prints
each arm's summed self CPU time and the ops whose self time differs most between the arms, with
their call counts. One call per arm: read the differences of ops that only one arm runs, or runs
a different number of times (``aten::cat``, the attention kernel), not small differences in
``aten::mm``, which both arms run equally often. ``--json PATH`` writes every op's totals.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from prefixtune import PrefixModel
from prefixtune.base_models import load_model

from .arms import prefix_config
from .common import random_tokens, settings, start, write_json
from .generate import memory_arm
from .profiling import as_json, op_times, print_op_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prefix-kind", choices=("kv", "memory"), default="kv",
                        help="the prefixed arm: the key/value prefix (default) or a memory prefix")
    parser.add_argument("--json", type=Path, help="also write every op's totals here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    header = start(__file__, argv, args.threads)
    plain = load_model()[0].eval()
    if args.prefix_kind == "memory":
        wrapped = memory_arm(load_model()[0])[1]
    else:
        wrapped = PrefixModel.wrap(load_model()[0], prefix_config()).eval()
        wrapped.materialize()
    ids = random_tokens(plain.config.vocab_size, args.batch_size, 32)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=2,
              min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens)
    arms = {"plain": lambda: plain.generate(**kw),
            "memory" if args.prefix_kind == "memory" else "prefixtune": lambda: wrapped.generate(**kw)}
    with torch.inference_mode():
        for call in arms.values():
            call()
        results = {name: op_times(call) for name, call in arms.items()}
    print_op_table(results, args.top)
    write_json(args.json, {**header, "args": settings(args), "arms": as_json(results)})


if __name__ == "__main__":
    main()
