"""torch.compile on the training step: each transformer block compiled in place, against eager.

Run from the repository root:

    .venv/bin/python benchmarks/compile_step.py --seq-len 128 --batch-size 8 --repeats 5

Issue 7 asks to try ``torch.compile`` where it helps and keep it optional. This measures the
simplest form of it on one fixed batch shape: every decoder block of a random-weight model of
the bundled SmolLM2-135M's shape (float32) goes through ``module.compile()`` (the prefix
encoder, embeddings and the chunked loss stay eager), with dynamo's recompile limit raised to
cover the 30 blocks (each block is its own module with its own prefix site index, so each
compiles once). Two arms, each with its own copy of the model and the same prefix weights,
interleaved after one warm-up step each (the compiled arm's warm-up is the compilation, timed
on its own): median seconds per step, the median of the paired ratios, and the largest
difference between the two arms' losses over the timed steps (float32: the compiled kernels
fuse and reorder arithmetic).

``--train-demo OUT`` instead runs ``prefixtune train`` with no arguments (the README's job: the
bundled model, 80 steps of the built-in demo task) into ``OUT`` with every block compiled the
same way but with ``dynamic=True`` (the batches differ in length), which is what a
``--compile`` training option would do; compare its ``OUT/metrics.jsonl`` and final scores
with a plain ``prefixtune train --output-dir OTHER``. docs/performance.md says why there is no
such option.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling import random_model  # noqa: E402

from prefixtune import PrefixConfig, PrefixModel, arch  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--train-demo", metavar="OUT", help="run the README's training job with compiled blocks "
                        "into OUT; options this script does not know (e.g. --lr 1e-3) go to prefixtune train")
    args, extra = parser.parse_known_args(argv)
    if extra and not args.train_demo:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args, extra


def compile_blocks(model: PrefixModel, **options) -> int:
    """``module.compile(**options)`` on every transformer block of ``model``; dynamo's recompile
    limit raised so that each block (its own module, its own site index) gets its own entry."""
    blocks = [block for group in model.layout.groups for block in arch._blocks(model.model, group)]
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(blocks))
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def train_demo(out: str, extra: list[str]) -> None:
    """``prefixtune train --output-dir OUT [extra]`` with each block compiled as soon as the model is wrapped."""
    from prefixtune.cli import main as cli

    wrap = PrefixModel.wrap.__func__

    def wrap_and_compile(cls, *args, **kwargs):
        wrapped = wrap(cls, *args, **kwargs)
        compile_blocks(wrapped, dynamic=True)
        return wrapped

    PrefixModel.wrap = classmethod(wrap_and_compile)
    raise SystemExit(cli(["train", "--output-dir", out, *extra]))


def main(argv=None) -> None:
    args, extra = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.train_demo:
        train_demo(args.train_demo, extra)
    torch.manual_seed(0)
    base = random_model("smollm2-135m", "cpu", torch.float32).requires_grad_(False).train()
    eager = PrefixModel.wrap(base, PrefixConfig(prefix_length=10, reparam_hidden_size=512)).train()
    compiled = copy.deepcopy(eager)
    blocks = compile_blocks(compiled)
    ids = torch.randint(3, base.config.vocab_size, (args.batch_size, args.seq_len))

    def step(model) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, return_logits=False).loss
        loss.backward()
        return time.perf_counter() - start, loss.item()

    step(eager)
    compile_s, _ = step(compiled)
    arms = {"eager": eager, "compiled": compiled}
    times, losses = {name: [] for name in arms}, {name: [] for name in arms}
    for i in range(args.repeats):
        for name in (list(arms) if i % 2 == 0 else list(reversed(arms))):
            seconds, loss = step(arms[name])
            times[name].append(seconds)
            losses[name].append(loss)
    ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
    diff = max(abs(c - e) for c, e in zip(losses["compiled"], losses["eager"]))
    print(f"batch {args.batch_size} x {args.seq_len}, {blocks} blocks, {args.threads} threads")
    print(f"first compiled step (compilation): {compile_s:.1f} s")
    for name in arms:
        print(f"{name:9s} {statistics.median(times[name]):.3f} s/step  {[round(t, 2) for t in times[name]]}")
    print(f"compiled / eager (paired median): {ratio:.3f}x; largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
