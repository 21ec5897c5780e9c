"""How the cost of a prefix-tuning step grows: step time and memory against prefix length, sequence length and prefixed layers.

Run from the repository root (CPU, small bounded sizes; about 5 minutes on 2 cores):

    python -m benchmarks.scaling --json /tmp/bench/scaling.json

``python -m benchmarks.gpu`` calls :func:`sweep` on a GPU with larger sizes. The model is a
random-weight Llama with the bundled SmolLM2-135M's shape (``--shape``, ``benchmarks/shapes.py``;
timings do not depend on the weight values). Two arms of ``benchmarks/arms.py``: ``floor`` and
``prefixtune_logits`` (both compute the model's own loss over the full logits, so the ratio is
the prefix's cost alone). Three sweeps:

* prefix length ``L_p`` (1-200) at one sequence length;
* sequence length (64-2048) at ``L_p = 10``;
* number of prefixed layers ``n`` (the *last* ``n`` layers) at ``L_p = 10``: below the lowest
  prefixed layer no gradient is needed, so the step can get cheaper than the floor.

Each point reports the median step seconds and the median of paired ratios to the floor
(arms interleaved, rotating order), the bytes autograd saves for backward (counted with
``saved_tensors_hooks``, unique storages; the same number on any device) and, on CUDA,
the step's peak allocation above what was resident before it (``max_memory_allocated``).
``--plot`` draws a results file (this one's or ``gpu``'s).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from .arms import build, prefix_config
from .common import rotated, settings, start, sync, token_batch, write_json
from .shapes import SHAPES, random_model

PREFIXED = "prefixtune_logits"
"""The prefixed arm of every point (``benchmarks/arms.py``)."""


def saved_bytes_counter():
    """``(hooks, total)``: a ``saved_tensors_hooks`` context and a function giving the bytes of
    the distinct storages autograd saved while it was active."""
    seen: dict = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without a storage
            pass
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lambda: sum(seen.values())


def measure(step, device) -> dict:
    """Run ``step()`` once (forward + backward): seconds, saved-for-backward bytes, CUDA peak above resident."""
    cuda = torch.device(device).type == "cuda"
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    hooks, saved = saved_bytes_counter()
    begin = time.perf_counter()
    with hooks:
        step()
    sync()
    seconds = time.perf_counter() - begin
    peak = torch.cuda.max_memory_allocated(device) - resident if cuda else None
    return {"s": seconds, "saved_bytes": saved(), "peak_bytes": peak}


def compare(steps: dict, repeats: int, warmup: int, device) -> dict:
    """Interleave ``{name: step}``; per arm the median seconds, paired ratio to ``floor``, memory."""
    runs = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name in rotated(list(steps), i):
            result = measure(steps[name], device)
            if i >= warmup:
                runs[name].append(result)
    out = {}
    for name, rs in runs.items():
        out[name] = {
            "median_s": statistics.median(r["s"] for r in rs),
            "vs_floor": statistics.median(r["s"] / f["s"] for r, f in zip(rs, runs["floor"])),
            "saved_bytes": max(r["saved_bytes"] for r in rs),
            "peak_bytes": None if rs[0]["peak_bytes"] is None else max(r["peak_bytes"] for r in rs),
            "times_s": [r["s"] for r in rs],
        }
    return out


def sweep(model, device, *, prefix_lengths, seq_lens, layer_counts, base_seq: int, tokens: int, repeats: int,
          warmup: int, log=print) -> dict:
    """The three sweeps on ``model`` (left untouched: the arms use copies). The prefixed arm holds
    one prefix per point (added when first needed) and runs the point's as its active one."""
    floor = build("floor", copy.deepcopy(model))
    prefixed = build(PREFIXED, copy.deepcopy(model))
    num_layers = model.config.num_hidden_layers
    results = {"base_seq": base_seq, "tokens_per_batch": tokens, "num_layers": num_layers,
               "prefix_length": {}, "seq_len": {}, "layers": {}}

    def point(kind: str, key, name: str, config, seq_len: int) -> None:
        if name not in prefixed.module.prefixes:
            prefixed.module.add_prefix(name, config)
        prefixed.module.set_active(name)
        ids = token_batch(model.config.vocab_size, tokens, seq_len, device)
        row = compare({"floor": lambda: floor.step(ids), PREFIXED: lambda: prefixed.step(ids)}, repeats, warmup, device)
        row["batch"], row["seq_len"] = ids.shape[0], seq_len
        results[kind][str(key)] = row
        log(point_line(kind, key, row))

    for length in prefix_lengths:
        point("prefix_length", length, f"L{length}", prefix_config(length), base_seq)
    for seq_len in seq_lens:
        point("seq_len", seq_len, "default", None, seq_len)
    for count in layer_counts:
        layers = tuple(range(num_layers - count, num_layers))
        point("layers", count, f"last{count}", prefix_config(layers=layers), base_seq)
    return results


def point_line(kind: str, key, row: dict) -> str:
    """One point as a log line: times, ratio, memory of both arms."""
    pt, fl = row[PREFIXED], row["floor"]
    peak = "" if pt["peak_bytes"] is None else \
        f"  peak {pt['peak_bytes'] / 2**20:8.1f} MiB (floor {fl['peak_bytes'] / 2**20:.1f})"
    return (f"{kind:>13} {str(key):>5}  batch {row['batch']:>3}x{row['seq_len']:<5} floor {fl['median_s']:.4f}s  "
            f"{PREFIXED} {pt['median_s']:.4f}s  {pt['vs_floor']:.2f}x  saved {pt['saved_bytes'] / 2**20:8.1f} MiB "
            f"(floor {fl['saved_bytes'] / 2**20:.1f}){peak}")


def plot(results: dict, path: Path, title: str) -> None:
    """One figure: per sweep, step time / floor (top) and memory (bottom) against the swept quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [("prefix_length", "prefix length L_p"), ("seq_len", "sequence length"), ("layers", "prefixed layers (last n)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False)
    for col, (kind, label) in enumerate(sweeps):
        points = sorted(results[kind].items(), key=lambda kv: int(kv[0]))
        xs = [int(k) for k, _ in points]
        arm = prefixed_arm(points[0][1])
        top, bottom = axes[0][col], axes[1][col]
        top.plot(xs, [row[arm]["vs_floor"] for _, row in points], "o-", label=f"{arm} / floor")
        top.axhline(1.0, color="grey", lw=0.8)
        top.set_ylabel("step time / floor")
        memory = "peak_bytes" if points[0][1][arm]["peak_bytes"] is not None else "saved_bytes"
        for name in ("floor", arm):
            bottom.plot(xs, [row[name][memory] / 2**20 for _, row in points], "o-", label=name)
        bottom.set_ylabel("peak MiB above resident" if memory == "peak_bytes" else "MiB saved for backward")
        bottom.set_xlabel(label)
        if kind == "seq_len":
            for ax in (top, bottom):
                ax.set_xscale("log", base=2)
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def prefixed_arm(row: dict) -> str:
    """The prefixed arm's key in a point: the one that is not the floor's (``prefixtune_logits``;
    ``prefixtune`` in the results files under benchmarks/results)."""
    return next(key for key in row if key not in ("floor", "batch", "seq_len"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prefix-lengths", type=int, nargs="+", default=[1, 10, 50, 100, 200])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 10, 20, 30], help="numbers of prefixed layers")
    parser.add_argument("--base-seq", type=int, default=128, help="sequence length of the prefix-length and layer sweeps")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch (batch = tokens // seq_len)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", nargs=3, metavar=("JSON", "PNG", "TITLE"),
                        help="only draw the sweeps of a results file (this script's or gpu's) and exit")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:
        source, png, title = args.plot
        data = json.loads(Path(source).read_text())
        plot(data["scaling"] if "scaling" in data else data["sections"]["scaling"], Path(png), title)
        return
    results = start(__file__, argv, args.threads)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    model = random_model(args.shape, args.device, dtype)
    layers = [n for n in args.layers if n <= model.config.num_hidden_layers]
    results.update(args=settings(args), dtype=str(dtype))
    results["scaling"] = sweep(model, args.device, prefix_lengths=args.prefix_lengths, seq_lens=args.seq_lens,
                               layer_counts=layers, base_seq=args.base_seq, tokens=args.tokens, repeats=args.repeats,
                               warmup=args.warmup, log=lambda line: print(line, flush=True))
    if args.json:
        write_json(args.json, results)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
