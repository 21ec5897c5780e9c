"""How the cost of a prefix-tuning step grows: step time and memory against prefix length, sequence length and prefixed layers.

Run from the repository root (CPU, small bounded sizes; about 5 minutes on 2 cores):

    .venv/bin/python benchmarks/scaling.py --json /tmp/bench/scaling.json

``benchmarks/gpu.py`` calls :func:`sweep` on a GPU with larger sizes. The model is a
random-weight Llama with the bundled SmolLM2-135M's shape (``--shape``; timings do not
depend on the weight values). Three sweeps, each point measured against the floor (the
frozen model's forward + backward to its input embeddings, see docs/performance.md):

* prefix length ``L_p`` (1-200) at one sequence length;
* sequence length (64-2048) at ``L_p = 10``;
* number of prefixed layers ``n`` (the *last* ``n`` layers) at ``L_p = 10``: below the lowest
  prefixed layer no gradient is needed, so the step can get cheaper than the floor.

Each point reports the median step seconds and the median of paired ratios to the floor
(arms interleaved, rotating order), the bytes autograd saves for backward (counted with
``saved_tensors_hooks``, unique storages; the same number on any device) and, on CUDA,
the step's peak allocation above what was resident before it (``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixtune import PrefixConfig, PrefixModel  # noqa: E402

from common import machine_info, rotated, write_json  # noqa: E402  (benchmarks/common.py)

HIDDEN = 512
SHAPES = {
    # the bundled SmolLM2-135M-Instruct (prefixtune.models.BUNDLED)
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, head_dim=64, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # a Llama-3.2-1B-like shape
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, head_dim=64, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    # for --smoke runs
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, head_dim=16, tie_word_embeddings=True),
}


def random_model(shape: str, device, dtype, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` of the named shape, on ``device`` in ``dtype``, sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 2
    return model


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


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
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    hooks, saved = saved_bytes_counter()
    start = time.perf_counter()
    with hooks:
        step()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - resident if cuda else None
    return {"s": seconds, "saved_bytes": saved(), "peak_bytes": peak}


def floor_step(model, ids):
    """The frozen model's forward + backward down to its input embeddings (no key/value cache: a training step needs none)."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=ids, use_cache=False).loss.backward()


def prefix_step(wrapped, ids, name):
    wrapped.zero_grad(set_to_none=True)
    wrapped(input_ids=ids, labels=ids, prefix=name).loss.backward()


def compare(arms: dict, repeats: int, warmup: int, device) -> dict:
    """Interleave ``{name: step}``; per arm the median seconds, paired ratio to ``floor``, memory."""
    runs = {name: [] for name in arms}
    for i in range(warmup + repeats):
        for name in rotated(list(arms), i):
            result = measure(arms[name], device)
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


def batch(vocab: int, tokens: int, seq_len: int, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, tokens // seq_len)
    return torch.randint(0, vocab, (rows, seq_len), generator=generator).to(device)


def sweep(model, device, *, prefix_lengths, seq_lens, layer_counts, base_seq: int, tokens: int, repeats: int,
          warmup: int, log=print) -> dict:
    """The three sweeps on ``model`` (left untouched: the arms use copies)."""
    floor_model = copy.deepcopy(model).train()
    floor_model.requires_grad_(False)
    num_layers = model.config.num_hidden_layers
    wrapped = PrefixModel.wrap(copy.deepcopy(model), PrefixConfig(prefix_length=10, reparam_hidden_size=HIDDEN),
                               name="L10")
    wrapped.train()
    vocab = model.config.vocab_size
    results = {"base_seq": base_seq, "tokens_per_batch": tokens, "num_layers": num_layers,
               "prefix_length": {}, "seq_len": {}, "layers": {}}

    def point(kind: str, key, name: str, config: PrefixConfig | None, seq_len: int) -> None:
        if config is not None and name not in wrapped.prefixes:
            wrapped.add_prefix(name, config)
        ids = batch(vocab, tokens, seq_len, device)
        arms = {"floor": lambda: floor_step(floor_model, ids), "prefixtune": lambda: prefix_step(wrapped, ids, name)}
        row = compare(arms, repeats, warmup, device)
        row["batch"], row["seq_len"] = ids.shape[0], seq_len
        results[kind][str(key)] = row
        pt, fl = row["prefixtune"], row["floor"]
        peak = "" if pt["peak_bytes"] is None else f"  peak {pt['peak_bytes'] / 2**20:8.1f} MiB (floor {fl['peak_bytes'] / 2**20:.1f})"
        log(f"{kind:>13} {str(key):>5}  batch {ids.shape[0]:>3}x{seq_len:<5} floor {fl['median_s']:.4f}s  "
            f"prefixtune {pt['median_s']:.4f}s  {pt['vs_floor']:.2f}x  saved {pt['saved_bytes'] / 2**20:8.1f} MiB "
            f"(floor {fl['saved_bytes'] / 2**20:.1f}){peak}")

    for length in prefix_lengths:
        point("prefix_length", length, f"L{length}", PrefixConfig(prefix_length=length, reparam_hidden_size=HIDDEN),
              base_seq)
    for seq_len in seq_lens:
        point("seq_len", seq_len, "L10", None, seq_len)
    for count in layer_counts:
        layers = tuple(range(num_layers - count, num_layers))
        point("layers", count, f"last{count}",
              PrefixConfig(prefix_length=10, reparam_hidden_size=HIDDEN, layers=layers), base_seq)
    return results


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
        top, bottom = axes[0][col], axes[1][col]
        top.plot(xs, [row["prefixtune"]["vs_floor"] for _, row in points], "o-", label="prefixtune / floor")
        top.axhline(1.0, color="grey", lw=0.8)
        top.set_ylabel("step time / floor")
        memory = "peak_bytes" if points[0][1]["prefixtune"]["peak_bytes"] is not None else "saved_bytes"
        for arm in ("floor", "prefixtune"):
            bottom.plot(xs, [row[arm][memory] / 2**20 for _, row in points], "o-", label=arm)
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
                        help="only draw the sweeps of a results file (this script's or gpu.py's) and exit")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.plot:
        import json

        source, png, title = args.plot
        data = json.loads(Path(source).read_text())
        plot(data["scaling"] if "scaling" in data else data["sections"]["scaling"], Path(png), title)
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    info = machine_info(args.threads)
    print("  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    model = random_model(args.shape, args.device, dtype)
    layers = [n for n in args.layers if n <= model.config.num_hidden_layers]
    results = sweep(model, args.device, prefix_lengths=args.prefix_lengths, seq_lens=args.seq_lens,
                    layer_counts=layers, base_seq=args.base_seq, tokens=args.tokens, repeats=args.repeats,
                    warmup=args.warmup, log=lambda line: print(line, flush=True))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.json:
        write_json(args.json, {"machine": info, "args": settings, "dtype": str(dtype), "scaling": results})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
