"""Ops a training step dispatches: the floor's and each prefixtune arm's, forward and backward.

Run from the repository root:

    python -m benchmarks.op_count [--shape smollm2-135m] [--paths auto pad grouped mask] [--json out.json]

On a GPU, a small model's training step is host-bound (docs/studies/performance-gpu.md, "Where the step
time goes": the 135M model's GPU is busy 60 % of its step), so the step costs what it launches more
than what each launch computes. This script counts the non-view aten ops of one forward and one
backward with a dispatch mode: on CUDA nearly every one is a kernel launch. The counts do not
depend on the device, the weights or the machine's load, so a CPU run says exactly how many
ops a change removes, and where (op name, and the autograd node that ran it in backward).

Arms (``benchmarks/arms.py``): ``floor``, ``floor_cache``, and ``prefixtune`` (the chunked loss)
and ``prefixtune_logits`` (the model's own loss, like the floor) once per attention policy in
``--paths`` (``arms.POLICIES``; a row ``prefixtune pad`` is ``prefixtune`` under the ``pad``
policy). Random weights of the model's shape (``benchmarks/shapes.py``), a batch of ``--batch``
rows of ``--seq-len`` tokens without padding, prefix length 10. Each arm is built, counted and
dropped in turn, so one model copy at a time is held besides the base.
"""

from __future__ import annotations

import argparse
import collections
import copy
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefixtune import attention

from .arms import POLICIES, build
from .common import settings, start, token_batch, write_json
from .shapes import SHAPES, random_model


class OpCounter(TorchDispatchMode):
    """Counts each non-view aten op by ``(op, autograd node)``; the node is ``-`` in forward."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            node = torch._C._current_autograd_node()
            self.counts[(str(func.overloadpacket), node.name() if node is not None else "-")] += 1
        return func(*args, **(kwargs or {}))


def count_step(loss_fn) -> dict:
    """``{"forward": Counter, "backward": Counter}`` of one call of ``loss_fn`` and its backward,
    after one uncounted call (first-call work such as the masks' caches is not a step's)."""
    loss_fn().backward()
    with OpCounter() as forward:
        loss = loss_fn()
    with OpCounter() as backward:
        loss.backward()
    return {"forward": forward.counts, "backward": backward.counts}


class reused_causal_bias:
    """torch's ``causal_lower_right`` bias is a tensor subclass, which cannot be created under a
    dispatch mode: the counted call reuses the objects that the uncounted call created."""

    def __enter__(self):
        made, self.real = {}, attention.causal_lower_right

        def reused(q_len: int, kv_len: int):
            if (q_len, kv_len) not in made:
                made[q_len, kv_len] = self.real(q_len, kv_len)
            return made[q_len, kv_len]

        attention.causal_lower_right = reused

    def __exit__(self, *exc):
        attention.causal_lower_right = self.real


def counted_arms(paths: list[str]) -> list[tuple[str, str, str | None]]:
    """``(row, arm, policy)`` of every row: the floors, then each prefixed arm under each policy."""
    rows = [("floor", "floor", None), ("floor_cache", "floor_cache", None)]
    for path in paths:
        rows += [(f"{arm} {path}", arm, path) for arm in ("prefixtune", "prefixtune_logits")]
    return rows


def count_arms(shape: str, paths: list[str], rows: int, seq_len: int) -> tuple[dict, int]:
    """``({row: counts}, layers)``: each arm of :func:`counted_arms` on a copy of the model, counted."""
    base = random_model(shape)
    ids = token_batch(base.config.vocab_size, rows * seq_len, seq_len)
    counts = {}
    with reused_causal_bias():
        for row, name, policy in counted_arms(paths):
            arm = build(name, copy.deepcopy(base), policy=policy)
            counts[row] = count_step(lambda arm=arm: fresh_loss(arm, ids))
            del arm
    return counts, base.config.num_hidden_layers


def fresh_loss(arm, ids: torch.Tensor) -> torch.Tensor:
    """The arm's loss with its gradients cleared (no op runs for that): backward then writes them
    anew, as a training step's does, rather than adding to the last call's."""
    arm.module.zero_grad(set_to_none=True)
    return arm.loss(ids)


def extra(counts: dict, floor: dict, phase: str, top: int) -> list:
    """The ``top`` ops that ``counts`` runs more often than the floor in ``phase``."""
    diff = counts[phase] - floor[phase]
    return [[op, node, n] for (op, node), n in diff.most_common(top)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--paths", nargs="+", choices=list(POLICIES), default=["auto", "pad", "grouped", "mask"],
                        help="attention policies of the prefixed arms (benchmarks/arms.py); default: %(default)s")
    parser.add_argument("--batch", type=int, default=2, help="rows (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row (default: %(default)s)")
    parser.add_argument("--top", type=int, default=8, help="extra ops to list per arm and phase")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    header = start(__file__, argv, 1)
    counts, layers = count_arms(args.shape, args.paths, args.batch, args.seq_len)
    floor = counts["floor"]
    print(f"\n{args.shape} ({layers} layers), {args.batch} x {args.seq_len} tokens, prefix length 10: non-view aten ops per step")
    print(f"{'arm':<28} {'forward':>8} {'backward':>9} {'total':>7} {'over floor':>11} {'per layer':>10}")
    results = {}
    for name, c in counts.items():
        fwd, bwd = sum(c["forward"].values()), sum(c["backward"].values())
        over = fwd + bwd - sum(floor["forward"].values()) - sum(floor["backward"].values())
        results[name] = {"forward": fwd, "backward": bwd, "over_floor": over,
                         "extra_forward": extra(c, floor, "forward", args.top),
                         "extra_backward": extra(c, floor, "backward", args.top)}
        print(f"{name:<28} {fwd:>8} {bwd:>9} {fwd + bwd:>7} {over:>+11} {over / layers:>+10.1f}")
    for name, r in results.items():
        if name != "floor":
            for phase in ("forward", "backward"):
                ops = "; ".join(f"{op}{'' if node == '-' else f' ({node})'} +{n}" for op, node, n in r[f"extra_{phase}"])
                print(f"  {name}, {phase}: {ops}")
    write_json(args.json, {**header, "args": settings(args), "results": results})


if __name__ == "__main__":
    main()
