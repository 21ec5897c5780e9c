"""Greedy decoding throughput on the bundled model: plain vs prefixtune vs PEFT, and many prefixes at once.

Run from the repository root:

    python -m benchmarks.generate --batch-sizes 1 8 --new-tokens 64 --repeats 5

One call is ``generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)`` on random
prompts of ``--prompt-len`` tokens (fixed seed, no padding), so every arm produces exactly
``N`` new tokens per row. Arms:

* ``plain``: the base model's own ``model.generate``.
* ``plain_copy``: the same on a second instance of the base model: how far two instances of one
  model differ, which every ratio between arms on separate instances carries.
* ``prefixtune``: ``PrefixModel.wrap(model, PrefixConfig(10, reparameterize=True, 512))``
  (the prefix of ``benchmarks/arms.py``), materialized (the MLP folded into fixed key/values),
  every row the same prefix.
* ``memory``: ``PrefixModel.wrap(model, PrefixConfig(kind="memory"))``, its memory drawn at random
  (std 0.01, so that it changes the output): a term on each head's output, nothing in the cache.
* ``peft``: ``peft.get_peft_model`` with ``PrefixTuningConfig(num_virtual_tokens=10,
  prefix_projection=True, encoder_hidden_size=512)``, eval mode. If PEFT fails, the arm is
  reported as failed and the rest still runs.
* At batch 8 only, eight different materialized prefixes (length 10 each):
  ``mixed`` serves them in one call, one prefix per row (``prefix=[...]``);
  ``sequential`` serves them one after another, eight batch-1 calls with one prefix each.

Each arm has its own model instance (``mixed`` and ``sequential`` get identical prefixes
from the same seed); with ``--one-model``, ``plain``, ``prefixtune`` and ``memory`` share one, so that
nothing but the prefix differs between them. Arms are interleaved (each repeat runs every arm once, rotating the
order) on the same prompts; the table shows median seconds per call (for ``sequential``:
its eight calls together), new tokens per second, and the median of the per-repeat ratios
of throughput to ``plain``, with its 95 % bootstrap interval over the repeats
(``benchmarks.common.ratio_interval``). The first (warm-up) outputs are compared with ``plain``'s to
show whether a prefix changed anything. ``--json PATH`` writes the results, every call's seconds
included; ``--summarize PATH`` prints the tables of such a file again (intervals included) without
running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from prefixtune import PrefixConfig, PrefixModel
from prefixtune.base_models import load_model

from .arms import HIDDEN, PREFIX_LENGTH, peft_prefix_model, prefix_config
from .common import (build_each, first_line, interval_text, paired_ratio, print_arm_rows, random_tokens,
                     ratio_interval, ratio_text, rotated, settings, start, sync, write_json)

NUM_MIXED = 8
ARMS = ("plain", "plain_copy", "prefixtune", "memory", "peft", "mixed", "sequential")
MULTI_ARMS = ("mixed", "sequential")  # only at batch NUM_MIXED


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="one or more batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per row (forced: min = max)")
    parser.add_argument("--prompt-len", type=int, default=32, help="random prompt tokens per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per arm and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per arm and batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: cpu count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--summarize", type=Path, metavar="PATH",
                        help="print the tables of a results file written by --json (from its per-call seconds) "
                        "and run nothing")
    parser.add_argument("--one-model", action="store_true",
                        help="run plain, prefixtune and memory on one model instance (plain with the model's own "
                        "attention switched back in), so that nothing but the prefix differs between them")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="arms to run (default: all); e.g. --arms plain prefixtune for more repeats of the "
                        "ratio that matters in the same time")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- arms
# Each builder takes a fresh model and returns ``(run, module)``: ``run(ids, mask, gen_kwargs)`` ->
# generated ids ``[B, prompt_len + N]`` (for ``sequential`` the per-row outputs stacked in row order).
def plain_arm(model):
    model.eval()
    return (lambda ids, mask, kw: model.generate(input_ids=ids, attention_mask=mask, **kw)), model


def prefixtune_arm(model):
    wrapped = PrefixModel.wrap(model, prefix_config()).eval()
    wrapped.materialize()
    return (lambda ids, mask, kw: wrapped.generate(input_ids=ids, attention_mask=mask, **kw)), wrapped


def memory_arm(model, seed: int = 0):
    wrapped = PrefixModel.wrap(model, PrefixConfig(kind="memory")).eval()
    _random_memory(wrapped, "default", seed)
    return (lambda ids, mask, kw: wrapped.generate(input_ids=ids, attention_mask=mask, **kw)), wrapped


def _random_memory(wrapped: PrefixModel, name: str, seed: int) -> None:
    """Draw the memory of prefix ``name`` at random (std 0.01), so that it changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        memory = wrapped.prefixes[name].memory
        memory.copy_(torch.randn(memory.shape, generator=generator) * 0.01)


def one_model_arms(model, seed: int = 0) -> dict:
    """``plain``, ``prefixtune`` and ``memory`` on one model instance (``--one-model``): one ``PrefixModel``
    holding both prefixes, and ``plain`` calling the model with its own attention kernel switched back in
    (0.2 ms a switch, every arm switching once per call). Nothing but the prefix then differs between
    the arms: not the weights' place in memory, not the model's own state."""
    wrapped = PrefixModel.wrap(model, prefix_config(), name="kv").eval()
    wrapped.materialize()
    wrapped.add_prefix("memory", PrefixConfig(kind="memory"))
    _random_memory(wrapped, "memory", seed)
    own, prefixed = wrapped._base_attention, model.config._attn_implementation

    def call(attention: str, prefix: str | None):
        def run(ids, mask, kw):
            model.set_attn_implementation(attention)
            if prefix is None:
                return model.generate(input_ids=ids, attention_mask=mask, **kw)
            return wrapped.generate(input_ids=ids, attention_mask=mask, prefix=prefix, **kw)
        return run, wrapped

    return {"plain": call(own, None), "prefixtune": call(prefixed, "kv"), "memory": call(prefixed, "memory")}


def peft_arm(model):
    wrapped = peft_prefix_model(model).eval()
    return (lambda ids, mask, kw: wrapped.generate(input_ids=ids, attention_mask=mask, **kw)), wrapped


def multi_prefix_model(model, seed: int) -> tuple[PrefixModel, list[str]]:
    """A PrefixModel with ``NUM_MIXED`` different materialized prefixes; same seed, same prefixes."""
    torch.manual_seed(seed)
    names = [f"p{i}" for i in range(NUM_MIXED)]
    wrapped = PrefixModel.wrap(model, prefix_config(), name=names[0])
    for name in names[1:]:
        wrapped.add_prefix(name, prefix_config())
    wrapped.eval()
    wrapped.materialize()
    return wrapped, names


def mixed_arm(model, seed: int):
    wrapped, names = multi_prefix_model(model, seed)

    def run(ids, mask, kw):
        return wrapped.generate(input_ids=ids, attention_mask=mask, prefix=names, **kw)

    return run, wrapped


def sequential_arm(model, seed: int):
    wrapped, names = multi_prefix_model(model, seed)

    def run(ids, mask, kw):
        rows = [
            wrapped.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], prefix=name, **kw)
            for i, name in enumerate(names)
        ]
        return torch.cat(rows)

    return run, wrapped


def build_arms(batch_sizes: list[int], seed: int, wanted, new_model=lambda: load_model()[0],
               one_model: bool = False) -> tuple[dict, dict]:
    """``({name: (run, module)}, {name: error line})`` for the ``wanted`` arms that built / failed,
    each on its own ``new_model()`` (``one_model``: ``plain``, ``prefixtune`` and ``memory`` on one)."""
    if one_model:
        shared = one_model_arms(new_model(), seed)
        arms, failed = build_arms(batch_sizes, seed, [n for n in wanted if n not in shared], new_model)
        return {**{n: arm for n, arm in shared.items() if n in wanted}, **arms}, failed
    builders = {"plain": plain_arm, "plain_copy": plain_arm, "prefixtune": prefixtune_arm, "memory": memory_arm,
                "peft": peft_arm}
    if NUM_MIXED in batch_sizes:
        builders.update(mixed=lambda model: mixed_arm(model, seed), sequential=lambda model: sequential_arm(model, seed))
    return build_each({name: lambda build=build: build(new_model()) for name, build in builders.items() if name in wanted})


# ---------------------------------------------------------------------------- timing
def make_prompts(seed: int, batch_size: int, prompt_len: int, vocab_size: int):
    ids = random_tokens(vocab_size, batch_size, prompt_len, seed)
    return ids, torch.ones_like(ids)


def timed_call(run, ids, mask, gen_kwargs) -> tuple[float, torch.Tensor]:
    """Seconds of one call (on a GPU, until its work is done) and its output."""
    begin = time.perf_counter()
    with torch.inference_mode():
        out = run(ids, mask, gen_kwargs)
    sync()
    return time.perf_counter() - begin, out


def run_interleaved(arms: dict, failed: dict, ids, mask, gen_kwargs, repeats: int, warmup: int):
    """Per-arm lists of call seconds and each arm's first output; an arm that raises moves to ``failed``."""
    times = {name: [] for name in arms}
    outputs = {}
    expected = ids.shape[1] + gen_kwargs["max_new_tokens"]
    for i in range(warmup + repeats):
        for name in rotated(list(arms), i):
            if name in failed:
                continue
            try:
                seconds, out = timed_call(arms[name][0], ids, mask, gen_kwargs)
                if out.shape != (ids.shape[0], expected):
                    raise RuntimeError(f"output shape {tuple(out.shape)}, expected {(ids.shape[0], expected)}")
            except Exception as error:  # noqa: BLE001
                failed[name] = first_line(error)
                continue
            outputs.setdefault(name, out)
            if i >= warmup:
                times[name].append(seconds)
    return {name: t for name, t in times.items() if name not in failed and t}, outputs


def measure(arms: dict, failed: dict, wanted, batch_sizes, *, new_tokens: int, prompt_len: int, repeats: int,
            warmup: int, seed: int, pad_token_id: int, device="cpu", on_batch=lambda results: None) -> dict:
    """Every batch size's summary (:func:`summarize`), printed as it is done; ``on_batch(results so far)``
    after each one (to write them)."""
    vocab_size = next(iter(arms.values()))[1].config.vocab_size
    gen_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                  "pad_token_id": pad_token_id}
    out = {}
    for batch_size in batch_sizes:
        names = [n for n in wanted if n not in MULTI_ARMS or batch_size == NUM_MIXED]
        here = {n: arms[n] for n in names if n in arms}
        failed_here = {n: failed[n] for n in names if n in failed}
        ids, mask = (t.to(device) for t in make_prompts(seed, batch_size, prompt_len, vocab_size))
        times, outputs = run_interleaved(here, failed_here, ids, mask, gen_kwargs, repeats, warmup)
        failed.update(failed_here)
        summary = summarize(times, failed_here, outputs, batch_size * new_tokens, names)
        print_table(batch_size, prompt_len, new_tokens, summary)
        out[str(batch_size)] = summary
        on_batch(out)
    return out


# ---------------------------------------------------------------------------- results
def paired_speedup(times: dict, top: str, bottom: str) -> float | None:
    """Median over repeats of throughput(top) / throughput(bottom) = seconds(bottom) / seconds(top)."""
    return paired_ratio(times, bottom, top)


def same_output(outputs: dict, a: str, b: str) -> bool | None:
    if a not in outputs or b not in outputs:
        return None
    return bool(torch.equal(outputs[a], outputs[b]))


def summarize(times: dict, failed: dict, outputs: dict, tokens_per_call: int, arm_names: list[str]) -> dict:
    rows = {}
    for name in arm_names:
        if name in times:
            median = statistics.median(times[name])
            rows[name] = {
                "median_s": median,
                "tokens_per_s": tokens_per_call / median,
                "vs_plain": paired_speedup(times, name, "plain"),
                "vs_plain_95": None if name == "plain" else ratio_interval(times, "plain", name),  # plain's s / arm's s
                "times_s": times[name],
            }
        elif name in failed:
            rows[name] = {"error": failed[name]}
    checks = {f"{name} output == plain output": same_output(outputs, name, "plain") for name in ("peft", "prefixtune")}
    if "mixed" in arm_names:
        checks["mixed output == sequential output"] = same_output(outputs, "mixed", "sequential")
    return {
        "new_tokens_per_call": tokens_per_call,
        "arms": rows,
        "prefixtune_vs_peft": paired_speedup(times, "prefixtune", "peft"),
        "mixed_vs_sequential": paired_speedup(times, "mixed", "sequential"),
        "checks": checks,
    }


def print_table(batch_size: int, prompt_len: int, new_tokens: int, summary: dict) -> None:
    print(f"\nbatch={batch_size}  prompt_len={prompt_len}  new_tokens={new_tokens} per row")
    print(f"{'arm':<12}{'median s/call':>15}{'new tok/s':>12}{'vs plain':>10}{'95% interval':>15}")
    print_arm_rows(summary["arms"], 12,
                   lambda row: f"{row['median_s']:>15.3f}{row['tokens_per_s']:>12.1f}{ratio_text(row['vs_plain']):>10}"
                               f"{interval_text(row.get('vs_plain_95')):>15}")
    if "sequential" in summary["arms"]:
        print(f"(sequential: {NUM_MIXED} calls at batch 1, one prefix each; seconds are the {NUM_MIXED} together)")
        ratio = summary["mixed_vs_sequential"]
        print("mixed/sequential throughput: " + ("n/a" if ratio is None else f"{ratio:.2f}x"))
    for label, value in summary["checks"].items():
        print(f"{label}: {'n/a' if value is None else value}")
    sys.stdout.flush()


def summarize_saved(path: Path) -> None:
    """Print the tables of a ``--json`` results file again, from the per-call seconds it holds (a curated
    file's ``runs`` one after another)."""
    saved = json.loads(path.read_text())
    for run in saved.get("runs", [saved]):
        if "batch_size" not in run or "args" not in run:
            raise SystemExit(f"{path}: not a results file of benchmarks.generate (no batch_size and args)")
        print(f"\n{run.get('command', '')}  (code {run.get('code_version')})")
        for batch_size, done in run["batch_size"].items():
            arms = done["arms"]
            times = {name: row["times_s"] for name, row in arms.items() if "times_s" in row}
            failed = {name: row["error"] for name, row in arms.items() if "error" in row}
            summary = summarize(times, failed, {}, done["new_tokens_per_call"], list(arms))
            print_table(int(batch_size), run["args"]["prompt_len"], run["args"]["new_tokens"],
                        {**summary, "checks": done["checks"]})


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarize:
        summarize_saved(args.summarize)
        return
    results = start(__file__, argv, args.threads)
    print(f"warmup={args.warmup} repeats={args.repeats} prefix_length={PREFIX_LENGTH} hidden={HIDDEN} "
          f"greedy, min_new_tokens=max_new_tokens={args.new_tokens}")
    arms, failed = build_arms(args.batch_sizes, args.seed, args.arms, one_model=args.one_model)
    if not arms:
        raise SystemExit(f"every arm failed: {failed}")
    _, tokenizer = load_model()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results.update(args=settings(args), batch_size={})

    def save(done: dict) -> None:  # after every batch size, so a long run keeps what it has measured
        write_json(args.json, {**results, "batch_size": done})

    measure(arms, failed, args.arms, args.batch_sizes, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
            repeats=args.repeats, warmup=args.warmup, seed=args.seed, pad_token_id=pad_id, on_batch=save)
    if args.json:
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
