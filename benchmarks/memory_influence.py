"""Does a long input dilute a prefix? The key/value prefix against the memory prefix, on the bundled model.

A key/value prefix shares each head's softmax with the input, so its share of the output should
fall as the input grows; a memory prefix adds its term outside the softmax (``prefixtune.memory``),
so its share should not. This measures it: for inputs of 16 to 1,024 tokens, how far each
trained prefix moves the model's next-token distribution from the base model's, as the
Kullback-Leibler divergence ``KL(p_prefix || p_base)`` at the last position (where the task's
answer starts), averaged over ``--prompts`` inputs.

An input of length ``L`` is an E2E task prompt (``Table: {mr}\\nText:``) with real text in front of it,
cut from the left to ``L`` tokens (below the prompt's own length, the prompt's last ``L`` tokens).
Two kinds of text are put in front, each its own series: ``e2e``, references of other E2E dev
inputs (the task's own domain: a long context of it also moves the base model towards the task,
which lowers the divergence of either prefix for a reason other than dilution), and ``sst2``,
SST-2 movie-review sentences (another domain, which does not teach the base model the task). Both prefixes are trained
on the same task beforehand, for example::

    prefixtune train --data $PREFIXTUNE_DATA/e2e/trainset.csv --eval-data $PREFIXTUNE_DATA/e2e/devset.csv \\
        --prompt-field mr --completion-field ref --prompt-template 'Table: {prompt}\\nText:' \\
        --no-reparameterize --lr 3e-2 --max-grad-norm 0 --max-steps 120 --output-dir runs/e2e-kv
    prefixtune train ... --prefix-kind memory --lr 3e-3 --max-grad-norm 0 --output-dir runs/e2e-memory

Run from the repository root::

    python -m benchmarks.memory_influence --kv runs/e2e-kv --memory runs/e2e-memory --threads 2 \\
        --json benchmarks/results/memory-influence.json --plot docs/images/memory-influence.png
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch

from prefixtune import PrefixModel
from prefixtune.base_models import load_model
from prefixtune.data import root as data_root

from .common import start, write_json

LENGTHS = (16, 32, 64, 128, 256, 512, 1024)
TEMPLATE = "Table: {}\nText:"
FILLERS = ("e2e", "sst2")
"""The text put in front of the prompt: the task's own domain, or another one (module docstring)."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv", required=True, help="folder of a trained key/value prefix")
    parser.add_argument("--memory", required=True, help="folder of a memory prefix trained on the same task")
    parser.add_argument("--data-dir", default=None, help="the data folder (default: $PREFIXTUNE_DATA): "
                        "e2e/devset.csv for the prompts, sst2/dev.tsv for the other domain's text")
    parser.add_argument("--fillers", nargs="+", choices=FILLERS, default=list(FILLERS))
    parser.add_argument("--model", default=None, help="base model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--prompts", type=int, default=8, help="inputs averaged per length")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    return parser.parse_args(argv)


def filler_text(root: Path, filler: str, rows: list[dict]) -> str:
    """The text put in front of the prompts: E2E references of other dev inputs, or SST-2 sentences."""
    if filler == "e2e":
        return "\n".join(r["ref"] for r in rows[200:600])
    with (root / "sst2" / "dev.tsv").open(encoding="utf-8") as f:
        return "\n".join(line.split("\t")[0].strip() for line in list(f)[1:400])


def inputs(root: Path, tokenizer, filler: str, lengths, count: int) -> dict[int, list[torch.Tensor]]:
    """Per length, ``count`` token rows: a prompt with ``filler`` text in front, cut to that length."""
    rows = list(csv.DictReader((root / "e2e" / "devset.csv").open(encoding="utf-8")))
    prompts = list(dict.fromkeys(r["mr"] for r in rows))[:count]
    text = tokenizer(filler_text(root, filler, rows), add_special_tokens=False).input_ids
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    out = {}
    for length in lengths:
        out[length] = []
        for prompt in prompts:
            ids = tokenizer(TEMPLATE.format(prompt), add_special_tokens=False).input_ids
            out[length].append(torch.tensor([(text + newline + ids)[-length:]]))
    return out


@torch.no_grad()
def divergence(pm: PrefixModel, ids: torch.Tensor, prefix: str) -> float:
    """``KL(p_prefix || p_base)`` of the next token after ``ids``, in nats."""
    base = torch.log_softmax(pm(input_ids=ids, prefix=None).logits[0, -1].float(), -1)
    tuned = torch.log_softmax(pm(input_ids=ids, prefix=prefix).logits[0, -1].float(), -1)
    return float((tuned.exp() * (tuned - base)).sum())


def measure(pm: PrefixModel, rows: dict[int, list[torch.Tensor]], filler: str) -> dict:
    """Per kind, per length: the mean and each input's divergence."""
    results = {}
    for kind in ("kv", "memory"):
        results[kind] = {}
        for length, batch in rows.items():
            values = [divergence(pm, ids, kind) for ids in batch]
            results[kind][length] = {"mean": statistics.mean(values), "values": values}
            print(f"{filler:>5} {kind:>6} {length:>5} tokens: KL {statistics.mean(values):.4f}", flush=True)
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for axis, (filler, series) in zip(axes[0], results.items()):
        for kind, label in (("kv", "key/value prefix"), ("memory", "memory prefix")):
            lengths = sorted(series[kind], key=int)
            axis.plot([int(n) for n in lengths], [series[kind][n]["mean"] for n in lengths], marker="o", label=label)
        axis.set(xscale="log", xlabel="input tokens", ylabel="KL(prefixed || base), nats",
                 title=f"text in front: {'E2E references' if filler == 'e2e' else 'SST-2 sentences'}")
        axis.set_ylim(bottom=0)
        axis.legend()
    fig.suptitle("How far each prefix moves the next token after the E2E prompt, by input length")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    header = start(__file__, argv, args.threads)
    model, tokenizer = load_model(args.model)
    pm = PrefixModel.from_pretrained(model, args.kv, name="kv")
    pm.load_prefix(args.memory, name="memory")
    pm.eval()
    kinds = {name: pm.prefixes[name].kind for name in ("kv", "memory")}
    if kinds != {"kv": "kv", "memory": "memory"}:
        raise SystemExit(f"--kv and --memory must hold a key/value and a memory prefix, got {kinds}")
    root = data_root(args.data_dir, option="--data-dir")
    results = {filler: measure(pm, inputs(root, tokenizer, filler, args.lengths, args.prompts), filler)
               for filler in args.fillers}
    if args.json:
        write_json(args.json, {**header, "kv": str(args.kv), "memory": str(args.memory), "results": results})
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
