"""Training-step time of prefix tuning on the bundled model: prefixtune vs PEFT vs the floor.

Run from the repository root:

    .venv/bin/python benchmarks/train_step.py --seq-len 128 512 --repeats 5

One step is forward + backward on a random token batch (``labels = input_ids``). Arms:

* ``floor``: the frozen base model's own forward + backward down to its input
  embeddings (``inputs_embeds`` requires grad, every weight is frozen, ``use_cache=False``).
  Any prefix method must run at least this much, so it is the least a prefix-tuning step can
  cost.
* ``floor_cache`` (only with ``--arms``): the floor as measured until 2026-11-28 (evening),
  with transformers' default ``use_cache=True``, which copies every layer's keys and values
  into a cache that a training step never reads.
* ``prefixtune``: ``PrefixModel.wrap(model, PrefixConfig(10, reparameterize=True, 512))``,
  called as ``prefixtune train`` calls it (``return_logits=False``: the loss computed chunk by
  chunk without the ``[B, T, vocabulary]`` logits, prefixtune/lm_loss.py).
* ``prefixtune_logits``: the same model called with ``return_logits=True`` (the model's own
  loss over the full logits, as the floor and PEFT compute it).
* ``prefixtune_gc`` (only with ``--arms``): ``prefixtune`` with gradient checkpointing, for
  the cost of checkpointing (PEFT refuses it for prefix tuning).
* ``prefixtune_pad`` (only with ``--arms``): ``prefixtune`` with ``FUSED_CAUSAL = "pad"``, the
  attention path the default ``"auto"`` replaced on short CPU rows (prefixtune/attention.py).
* ``prefixtune_mask`` (only with ``--arms``): ``prefixtune`` with ``FUSED_CAUSAL = "mask"``, what
  ``"auto"`` took on short CPU rows before it took ``"bias_gqa"`` there.
* ``prefixtune_keep_mask`` (only with ``--arms``; differs only with ``--padded``): ``prefixtune``
  with the padding mask kept, as ``prefixtune train`` ran until 2026-11-28 (evening); it now
  drops the mask of right-padded decoder-only batches (``prefixtune.train.causal_batch``).
* ``peft``: ``peft.get_peft_model`` with ``PrefixTuningConfig(num_virtual_tokens=10,
  prefix_projection=True, encoder_hidden_size=512)``. If PEFT fails, the arm is reported
  as failed and the rest still runs.

Each arm has its own model instance. Arms are interleaved (each repeat runs every arm
once, rotating the order) and on the same batch; the table shows median seconds/step and
the median of the per-repeat ratios to the floor. ``--json PATH`` writes the results.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import PrefixConfig, PrefixModel  # noqa: E402
from prefixtune.models import load_model  # noqa: E402
from prefixtune.train import causal_batch  # noqa: E402

from common import build_each, first_line, peft_prefix_model, rotated, start, use_variant, write_json  # noqa: E402  (benchmarks/common.py)

PREFIX_LENGTH = 10
HIDDEN = 512
ARMS = ("floor", "prefixtune", "prefixtune_logits", "peft", "prefixtune_gc", "prefixtune_pad", "prefixtune_mask",
        "floor_cache", "prefixtune_keep_mask", "floor_b")
DEFAULT_ARMS = ("floor", "prefixtune", "prefixtune_logits", "peft")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128], help="one or more sequence lengths")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prefix-length", type=int, default=PREFIX_LENGTH, help="prefix length of every prefix arm")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per arm and sequence length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm and sequence length")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cpu count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--padded", action="store_true",
                        help="right-pad every other row after 3/4 of its length (a masked batch, as real text gives)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--arms", nargs="+", choices=[a for a in ARMS if a != "floor_b"], default=list(DEFAULT_ARMS),
                        help="arms to run (default: %(default)s); prefixtune_gc is prefixtune with gradient checkpointing")
    parser.add_argument("--second-floor", action="store_true",
                        help="add an arm floor_b: the floor on a second model instance, to see how far identical arms land apart")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- arms
def floor_arm(use_cache: bool = False):
    model, _ = load_model()
    model.requires_grad_(False).train()
    embed = model.get_input_embeddings()

    def step(ids, mask):
        inputs_embeds = embed(ids).detach().requires_grad_(True)
        model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=scored(ids, mask), use_cache=use_cache).loss.backward()

    return step, model


def prefixtune_arm(return_logits: bool = False, checkpointing: bool = False, fused: str | None = None,
                   prefix_length: int = PREFIX_LENGTH, keep_mask: bool = False):
    """What ``prefixtune train`` runs (the loss without the full logits, prefixtune/lm_loss.py);
    ``return_logits=True``: the model's own loss over the materialized logits, like the floor;
    ``checkpointing``: with gradient checkpointing (``--gradient-checkpointing``);
    ``fused``: ``attention.FUSED_CAUSAL`` during the step; ``keep_mask``: the padding mask kept
    (``prefixtune train`` drops it, ``prefixtune.train.causal_batch``)."""
    model, _ = load_model()
    config = PrefixConfig(prefix_length=prefix_length, reparameterize=True, reparam_hidden_size=HIDDEN)
    wrapped = PrefixModel.wrap(model, config)
    wrapped.train()
    if checkpointing:
        wrapped.gradient_checkpointing_enable()

    def step(ids, mask):
        with use_variant(fused):
            prefixtune_loss(wrapped, ids, mask, keep_mask, return_logits).backward()

    return step, wrapped


def peft_arm(prefix_length: int = PREFIX_LENGTH):
    wrapped = peft_prefix_model(load_model()[0], prefix_length, HIDDEN)
    wrapped.train()

    def step(ids, mask):
        wrapped(input_ids=ids, attention_mask=mask, labels=scored(ids, mask)).loss.backward()

    return step, wrapped


def build_arms(wanted=DEFAULT_ARMS, second_floor: bool = False, prefix_length: int = PREFIX_LENGTH) -> tuple[dict, dict]:
    """``({name: (step, module)}, {name: error line})`` for the ``wanted`` arms that built / failed."""
    length = {"prefix_length": prefix_length}
    builders = {"floor": floor_arm, "floor_cache": lambda: floor_arm(use_cache=True), "prefixtune": lambda: prefixtune_arm(**length),
                "prefixtune_logits": lambda: prefixtune_arm(True, **length), "peft": lambda: peft_arm(**length),
                "prefixtune_gc": lambda: prefixtune_arm(checkpointing=True, **length),
                "prefixtune_pad": lambda: prefixtune_arm(fused="pad", **length),
                "prefixtune_mask": lambda: prefixtune_arm(fused="mask", **length),
                "prefixtune_keep_mask": lambda: prefixtune_arm(keep_mask=True, **length)}
    chosen = {name: builders[name] for name in wanted}
    return build_each({**chosen, **({"floor_b": floor_arm} if second_floor else {})})


# ---------------------------------------------------------------------------- timing
def scored(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The labels: every token, but not the padding (-100), as training batches are (``data.collate``)."""
    return ids.masked_fill(mask == 0, -100)


def prefixtune_loss(wrapped, ids: torch.Tensor, mask: torch.Tensor, keep_mask: bool, return_logits: bool):
    """The loss of a prefixed step on the batch as ``prefixtune train`` makes it (padding unscored,
    the mask dropped where ``causal_batch`` may; ``keep_mask``: kept, as before that)."""
    batch = {"input_ids": ids, "attention_mask": mask, "labels": scored(ids, mask)}
    return wrapped(**(batch if keep_mask else causal_batch(wrapped, batch)), return_logits=return_logits).loss


def padding_mask(ids: torch.Tensor, padded: bool) -> torch.Tensor:
    """All ones; ``padded``: every other row right-padded after 3/4 of its length (mask 0 there),
    as batches of texts of different lengths are, so that every arm takes a masked path."""
    mask = torch.ones_like(ids)
    if padded:
        mask[1::2, ids.shape[1] * 3 // 4:] = 0
    return mask


def make_batch(seed: int, batch_size: int, seq_len: int, vocab_size: int, padded: bool = False):
    """Random tokens and their :func:`padding_mask`."""
    torch.manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len))
    return ids, padding_mask(ids, padded)


def timed_step(step, module, ids, mask) -> float:
    module.zero_grad(set_to_none=True)
    start = time.perf_counter()
    step(ids, mask)
    return time.perf_counter() - start


def run_interleaved(arms: dict, failed: dict, ids, mask, repeats: int, warmup: int) -> dict:
    """Per-arm lists of step seconds; an arm that raises mid-run moves to ``failed``."""
    times = {name: [] for name in arms}
    names = list(arms)
    for i in range(warmup + repeats):
        for name in rotated(names, i):
            if name in failed:
                continue
            try:
                seconds = timed_step(*arms[name], ids, mask)
            except Exception as error:  # noqa: BLE001
                failed[name] = first_line(error)
                continue
            if i >= warmup:
                times[name].append(seconds)
    return {name: t for name, t in times.items() if name not in failed}


# ---------------------------------------------------------------------------- results
def paired_ratio(times: dict, top: str, bottom: str) -> float | None:
    if top not in times or bottom not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[top], times[bottom]))


def summarize(times: dict, failed: dict) -> dict:
    rows = {}
    for name in ARMS:
        if name in times:
            rows[name] = {
                "median_s": statistics.median(times[name]),
                "vs_floor": paired_ratio(times, name, "floor"),
                "times_s": times[name],
            }
        elif name in failed:
            rows[name] = {"error": failed[name]}
    return {"arms": rows, "prefixtune_vs_peft": paired_ratio(times, "prefixtune", "peft"),
            "checkpointing_vs_prefixtune": paired_ratio(times, "prefixtune_gc", "prefixtune"),
            "prefixtune_vs_pad": paired_ratio(times, "prefixtune", "prefixtune_pad"),
            "prefixtune_vs_mask": paired_ratio(times, "prefixtune", "prefixtune_mask")}


def print_table(seq_len: int, batch_size: int, summary: dict) -> None:
    print(f"\nseq_len={seq_len}  batch={batch_size}")
    print(f"{'arm':<18}{'median s/step':>15}{'vs floor':>10}")
    for name, row in summary["arms"].items():
        if "error" in row:
            print(f"{name:<18}{'FAILED':>15}  {row['error']}")
            continue
        ratio = "-" if row["vs_floor"] is None else f"{row['vs_floor']:.2f}x"
        print(f"{name:<18}{row['median_s']:>15.3f}{ratio:>10}")
    ratio = summary["prefixtune_vs_peft"]
    print("prefixtune/peft: " + ("n/a" if ratio is None else f"{ratio:.2f}x"))
    if summary["checkpointing_vs_prefixtune"] is not None:
        print(f"prefixtune_gc/prefixtune: {summary['checkpointing_vs_prefixtune']:.2f}x")
    for other in ("pad", "mask"):
        if summary[f"prefixtune_vs_{other}"] is not None:
            print(f"prefixtune/prefixtune_{other}: {summary[f'prefixtune_vs_{other}']:.3f}x")
    sys.stdout.flush()


def main(argv=None) -> None:
    args = parse_args(argv)
    info = start(args.threads)
    print(f"warmup={args.warmup} repeats={args.repeats} prefix_length={args.prefix_length} hidden={HIDDEN}")

    arms, failed = build_arms(args.arms, args.second_floor, args.prefix_length)
    if not arms:
        raise SystemExit(f"every arm failed: {failed}")
    vocab_size = next(iter(arms.values()))[1].config.vocab_size
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    results = {"machine": info, "args": settings, "seq_len": {}}
    for seq_len in args.seq_len:
        ids, mask = make_batch(args.seed, args.batch_size, seq_len, vocab_size, args.padded)
        times = run_interleaved(arms, failed, ids, mask, args.repeats, args.warmup)
        summary = summarize(times, failed)
        print_table(seq_len, args.batch_size, summary)
        results["seq_len"][str(seq_len)] = summary
        if args.json:  # after every length, so a long run keeps what it has measured
            write_json(args.json, results)
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
