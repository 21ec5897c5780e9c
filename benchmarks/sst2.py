"""SST-2 with the bundled MiniLM encoder: prefix (+ head) against the task head alone.

P-Tuning v2 (Liu et al. 2022) showed that deep prefixes on encoders approach fine-tuning on
classification. The fair baseline for a frozen encoder is the task head trained alone (a
linear probe through BERT's pooler) with the same data, steps, batch and schedule. Both arms
run through the same loop below; each gets the best learning rate of a small grid, chosen
on dev accuracy (reported in full, so nobody has to trust the choice).

Run from the repository root:

    python -m benchmarks.sst2                                            # ~10 min on 2 CPU cores
    python -m benchmarks.sst2 --steps 20 --limit 64 --out /tmp/sst2.json  # smoke test

Results: docs/classification.md (and benchmarks/results/sst2.json, ``--out``'s default).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from prefixtune import PrefixConfig, PrefixModel, data, evaluate
from prefixtune.base_models import load_model

from .common import ROOT, settings, start, write_json
from .study import data_root

ARMS = {
    "head only": None,
    "prefix (MLP) + head": dict(prefix_length=16, reparameterize=True),
    "prefix (flat) + head": dict(prefix_length=16, reparameterize=False),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lrs", default="1e-2,3e-2", help="learning-rate grid, for every arm")
    parser.add_argument("--arms", default=",".join(ARMS), help="which arms to run, comma-separated")
    parser.add_argument("--limit", type=int, default=None, help="use only this many dev examples (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help=f"the data folder holding sst2/ (default: ${data.VARIABLE})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sst2.json"),
                        help="where the results are written (JSON)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = start(__file__, argv, args.threads)
    sst2 = data_root(args.data_dir) / "sst2"
    train = data.load_examples(str(sst2 / "train_full.tsv"), text_field="sentence", label_field="label")
    dev = data.load_examples(str(sst2 / "dev.tsv"), text_field="sentence", label_field="label", limit=args.limit)
    labels = data.label_names(train)
    _, tokenizer = load_model("minilm", task="classification", labels=labels)
    rows, _ = data.tokenize_classes(train, tokenizer, labels, max_length=128)
    dev_rows, _ = data.tokenize_classes(dev, tokenizer, labels, max_length=128)
    results.update(settings=settings(args), runs=[])
    for arm, prefix in [(a, ARMS[a]) for a in args.arms.split(",")]:
        for lr in [float(x) for x in args.lrs.split(",")]:
            run = _run(arm, prefix, lr, rows, dev_rows, labels, tokenizer.pad_token_id, args)
            results["runs"].append(run)
            print(f"{arm:22} lr {lr:<6g} dev accuracy {run['accuracy']:6.2f}  loss {run['loss']:.4f}  "
                  f"trainable {run['trainable']:>9,}  {run['seconds']:6.1f} s", flush=True)
    results["best"] = _best(results["runs"])
    write_json(Path(args.out), results)
    print("\nbest learning rate of each arm (dev accuracy, %):")
    for arm, run in results["best"].items():
        print(f"  {arm:22} {run['accuracy']:6.2f}  (lr {run['lr']:g})")


def _run(arm: str, prefix: dict | None, lr: float, rows: list, dev_rows: list, labels: list[str], pad_id: int,
         args) -> dict:
    torch.manual_seed(args.seed)
    model, _ = load_model("minilm", task="classification", labels=labels)
    pm = PrefixModel.wrap(model, PrefixConfig(**prefix)) if prefix else PrefixModel(model)
    params = pm.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / max(1, args.steps - warmup))))
    batches = data.batches(rows, args.batch_size, seed=args.seed, epoch=0)
    pm.train()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = data.collate(batches[step % len(batches)], pad_id)
        loss = pm(**batch, prefix=None if prefix is None else "default").loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            break
    seconds = time.perf_counter() - start
    scores = evaluate.classify(pm, dev_rows, pad_id, batch_size=64,
                               prefix=None if prefix is None else "default")
    return {"arm": arm, "lr": lr, "accuracy": scores["accuracy"], "loss": scores["loss"],
            "trainable": sum(p.numel() for p in params), "seconds": seconds, "steps": args.steps,
            "batch_size": args.batch_size}


def _best(runs: list[dict]) -> dict:
    best = {}
    for run in runs:
        if run["arm"] not in best or run["accuracy"] > best[run["arm"]]["accuracy"]:
            best[run["arm"]] = run
    return best


if __name__ == "__main__":
    main()
