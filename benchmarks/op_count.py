"""Ops a training step dispatches: the floor's and each prefixtune path's, forward and backward.

Run from the repository root:

    .venv/bin/python benchmarks/op_count.py [--shape smollm2-135m] [--paths pad bias_gqa mask] [--json out.json]

On a GPU, a small model's training step is host-bound (docs/performance-gpu.md, section 6:
the 135M model's GPU is busy 60 % of its step), so the step costs what it launches more than
what each launch computes. This script counts the non-view aten ops of one forward and one
backward with a dispatch mode: on CUDA nearly every one is a kernel launch. The counts do not
depend on the device, the weights or the machine's load, so a CPU run says exactly how many
ops a change removes, and where (op name, and the autograd node that ran it in backward).

Arms: ``floor`` (the frozen model's forward + backward to its input embeddings, its own loss,
no key/value cache), ``floor_cache`` (the same with transformers' default cache, the floor of
the GPU runs 1-5), ``prefixtune`` (what ``prefixtune train`` runs: the chunked loss) and
``prefixtune_logits`` (the model's own loss, like the floor), each prefixed arm once per
attention path in ``--paths`` (``attention.FUSED_CAUSAL``). Random weights of the model's shape
(benchmarks/scaling.py), a batch of ``--batch`` rows of ``--seq-len`` tokens, prefix length 10.
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import PrefixConfig, PrefixModel, attention  # noqa: E402

from common import start, use_variant, write_json  # noqa: E402
from scaling import SHAPES, batch, floor_step, random_model  # noqa: E402


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


def arms(shape: str, paths: list[str], rows: int, seq_len: int) -> tuple[dict, int]:
    """``({name: loss_fn}, layers)``: the floor, then each prefixed arm on each path."""
    base = random_model(shape, "cpu", torch.float32)
    ids = batch(base.config.vocab_size, rows * seq_len, seq_len, "cpu")
    floor_model = copy.deepcopy(base).train().requires_grad_(False)
    embed = floor_model.get_input_embeddings()
    config = PrefixConfig(prefix_length=10, reparameterize=True, reparam_hidden_size=512)
    wrapped = PrefixModel.wrap(base, config).train()

    def floor(use_cache: bool = False):
        return floor_model(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids, use_cache=use_cache).loss

    def prefixed(path: str, logits: bool):
        def loss():
            wrapped.zero_grad(set_to_none=True)
            with use_variant(path):
                return wrapped(input_ids=ids, labels=ids, return_logits=logits).loss
        return loss

    out = {"floor": floor, "floor_cache": lambda: floor(use_cache=True)}
    for path in paths:
        out[f"prefixtune {path}"] = prefixed(path, False)
        out[f"prefixtune_logits {path}"] = prefixed(path, True)
    return out, base.config.num_hidden_layers


def extra(counts: dict, floor: dict, phase: str, top: int) -> list:
    """The ``top`` ops that ``counts`` runs more often than the floor in ``phase``."""
    diff = counts[phase] - floor[phase]
    return [[op, node, n] for (op, node), n in diff.most_common(top)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--paths", nargs="+", choices=attention_paths(), default=["pad", "bias_gqa", "mask"],
                        help="attention paths of the prefixed arms (attention.FUSED_CAUSAL); default: %(default)s")
    parser.add_argument("--batch", type=int, default=2, help="rows (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row (default: %(default)s)")
    parser.add_argument("--top", type=int, default=8, help="extra ops to list per arm and phase")
    parser.add_argument("--json", type=Path, help="also write the counts here")
    return parser.parse_args(argv)


def attention_paths() -> list[str]:
    return ["auto", "pad", "bias", "bias_gqa", "mask"]


def main(argv=None) -> None:
    args = parse_args(argv)
    info = start(1)
    fns, layers = arms(args.shape, args.paths, args.batch, args.seq_len)
    with reused_causal_bias():
        counts = {name: count_step(fn) for name, fn in fns.items()}
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
    if args.json:
        write_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
