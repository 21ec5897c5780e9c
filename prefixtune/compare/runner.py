"""Run one method, or all of them, under the same task, data, step budget and seed.

Each method gets a freshly loaded base model (by default in its own process, so that its
peak memory is its own and a crash costs one row), the same tokenized training rows in the
same shuffled order, the same schedule (AdamW, warmup then decay, optional clipping), and
is scored on the same evaluation prompts with the same greedy decoding.

What is measured, per method:

- trainable parameters, and their share of the base model's parameters;
- peak memory while training: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``);
  on CPU the process's resident set size sampled every 5 ms by a thread (``/proc/self/statm``),
  reported as the peak and as the rise over the resident size just before the first step
  (weights, optimizer state, activations and gradients of training, not of loading);
- seconds per optimizer step and input tokens per second (padding excluded), over all
  steps but the first (which pays one-off costs);
- the checkpoint's size on disk, in the method's usual format;
- the task metrics on the evaluation prompts, and the training loss.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .. import data, evaluate, progress, spikes
from ..data import filters
from ..evaluate import generate_texts
from ..metrics import check_available
from ..options import split_list
from ..messages import first_line
from ..runtime import pick_device
from ..schedule import optimizer_for
from ..train import Diverged, Hooks, Stepper
from .config import CompareConfig
from .methods import METHODS, Method, PrefixlessGenerator, learning_rates, parse_methods

BIG_CHECKPOINT = 100 * 2**20


def compare(cfg: CompareConfig) -> dict:
    """Run every method of ``cfg.methods`` once per seed (``cfg.seeds``, else ``cfg.seed``), seed after
    seed; write compare.{json,md,png}; return the results, with their summary over seeds."""
    from . import report, stats

    methods = parse_methods(cfg.methods)
    rates = learning_rates(cfg.lr, methods)
    check_available(split_list(cfg.metrics))
    seeds = list(cfg.seeds or (cfg.seed,))
    examples(cfg), held_out_sets(cfg)  # bad data is one clear error now, not the same failure in every row
    out = Path(cfg.output_dir)
    _refuse_earlier_results(out, [method.name for method in methods])
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:  # whole seeds first: a run cut short leaves every method of the seeds it finished
        seeded = dataclasses.replace(cfg, seed=seed)
        for method in methods:
            shown = f" seed {seed}" if len(seeds) > 1 else ""
            print(f"\n== {method.name}{shown}: {method.label} (lr {rates[method.name]:g})", flush=True)
            run = run_isolated if cfg.isolate else run_method
            folder = out / method.name / f"seed-{seed}" if len(seeds) > 1 else out / method.name
            row = run(seeded, method.name, rates[method.name], folder)
            print(report.one_line(row), flush=True)
            rows.append(row)
    results = {"config": dataclasses.asdict(cfg), "machine": report.machine(pick_device(cfg.device)), "rows": rows,
               "summary": stats.summarize(rows, cfg.reference)}
    report.write(results, out)
    return results


def _refuse_earlier_results(out: Path, methods: list[str]) -> None:
    """A comparison writes compare.{json,md,png} and a folder per method into ``out``: one that holds any of
    them (an earlier comparison's, or a user's) is refused before anything runs, so nothing is replaced."""
    from .report import FILES

    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out}: is a file, not a folder")
    found = [name for name in (*FILES, *methods) if (out / name).exists()]
    if found:
        raise ValueError(f"--output-dir {out} already holds {', '.join(found)}, which this comparison would replace: "
                         "choose another --output-dir, or move them away")


def run_method(cfg: CompareConfig, name: str, lr: float, out: Path) -> dict:
    """Train and score one method in this process; returns its row of the table."""
    method = METHODS[name]
    row = {"method": name, "label": method.label, "lr": lr, "seed": cfg.seed, "status": "ok", "notes": []}
    device = pick_device(cfg.device)
    reason = _unavailable(method, cfg, device)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    try:
        return _train_and_score(cfg, method, lr, out, device, row)
    except Exception as error:  # noqa: BLE001 - one method failing must not stop the comparison
        import traceback

        out.mkdir(parents=True, exist_ok=True)
        (out / "stderr.txt").write_text(traceback.format_exc(), encoding="utf-8")
        return {**row, "status": "failed", "reason": first_line(error),
                "notes": [*row["notes"], f"traceback in {out / 'stderr.txt'}"]}


def _train_and_score(cfg, method: Method, lr: float, out: Path, device, row: dict) -> dict:
    from ..base_models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_examples, groups = examples(cfg)
    torch.manual_seed(cfg.seed)
    if method.load is not None:
        model, tokenizer = method.load(cfg, device)
    else:
        model, tokenizer = load_model(cfg.model, attn_implementation=cfg.attn_implementation)
        model.to(device)
    total_params = _count(model)
    row["total_params"] = total_params
    if method.build is None:  # the untuned base model
        row.update(trainable_params=0, trainable_pct=0.0, checkpoint_bytes=0)
        return {**row, **_score_sets(cfg, PrefixlessGenerator(model), tokenizer, groups)}

    tuned = method.build(model, tokenizer, cfg)
    row["notes"] += tuned.notes
    trainable = _count_list(tuned.trainable)
    row.update(trainable_params=trainable, trainable_pct=100.0 * trainable / total_params)
    rows, report = data.tokenize(train_examples, tokenizer, max_length=cfg.max_length,
                                 template=cfg.prompt_template, chat_template=cfg.chat_template,
                                 overflow=cfg.overflow)
    if report["truncated"]:
        row["notes"].append(f"{len(report['truncated'])} training examples truncated to --max-length")
    row["train_examples"] = len(rows)
    row.update(_train(cfg, tuned, rows, tokenizer.pad_token_id, lr, device, method.name))
    if row.get("status") != "ok":
        return row
    checkpoint = out / "checkpoint"
    shutil.rmtree(checkpoint, ignore_errors=True)
    tuned.save(checkpoint)
    row["checkpoint_bytes"] = _folder_bytes(checkpoint)
    row["checkpoint"] = str(checkpoint)
    if row["checkpoint_bytes"] > BIG_CHECKPOINT and not cfg.keep_checkpoints:
        shutil.rmtree(checkpoint)
        row["checkpoint"] = None
        row["notes"].append("checkpoint deleted after measuring it (--keep-checkpoints keeps it)")
    return {**row, **_score_sets(cfg, tuned.generator, tokenizer, groups)}


def _train(cfg: CompareConfig, tuned, rows: list[dict], pad_id: int, lr: float, device, name: str) -> dict:
    """Train ``tuned`` through ``prefixtune train``'s own loop and step; measure each step."""
    optimizer, scheduler = optimizer_for(tuned.groups or tuned.trainable, lr, cfg, cfg.max_steps)
    tuned.model.train()
    with PeakMemory(device) as memory, progress.bar(cfg.max_steps, f"{name}: train", unit="step") as bar:
        measured = _Measured(cfg.max_steps, cfg.quiet, bar, cfg.warmup_steps)
        try:
            stepper = Stepper(tuned.loss, tuned.trainable, pad_id, optimizer, scheduler, cfg, device)
            stepper.run(data.BatchOrder(rows, cfg.batch_size, cfg.seed), 0, cfg.max_steps, measured)
        except Diverged as err:
            return {"status": "failed", "reason": f"{err} at step {len(measured.losses) + 1}",
                    "losses": measured.losses}
    return {**measured.result(), **memory.result()}


class _Measured(Hooks):
    """What compare records of each step: loss, seconds (the device waited for) and input tokens."""

    def __init__(self, steps: int, quiet: bool, bar, warmup_steps: int = 0):
        self.steps, self.quiet, self.bar, self.warmup_steps = steps, quiet, bar, warmup_steps
        self.losses, self.seconds, self.tokens = [], [], []

    def after_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        self.losses.append(loss)
        self.seconds.append(seconds)
        self.tokens.append(tokens)
        self.bar.set_postfix(loss=f"{loss:.3f}")
        self.bar.update()
        if not self.quiet and step % max(1, self.steps // 10) == 0:
            progress.note(f"  step {step}/{self.steps}  loss {loss:.3f}  {seconds:.2f} s/step")

    def result(self) -> dict:
        """Seconds per step and tokens per second over every step but the first (which pays one-off
        costs); the final loss as the mean of the last fifth of the steps (at most 10); the largest
        loss / running-median ratio after warmup, and whether it is a spike (:mod:`prefixtune.spikes`)."""
        timed = slice(1, None) if len(self.seconds) > 1 else slice(None)
        tail = self.losses[-max(1, min(10, len(self.losses) // 5)):]
        ratio = spikes.largest_ratio(self.losses, self.warmup_steps)
        return {"steps": len(self.losses), "seconds_per_step": sum(self.seconds[timed]) / len(self.seconds[timed]),
                "tokens_per_s": sum(self.tokens[timed]) / sum(self.seconds[timed]),
                "train_seconds": sum(self.seconds), "first_loss": self.losses[0], "final_loss": sum(tail) / len(tail),
                "spike_ratio": ratio, "spike": ratio is not None and ratio > spikes.THRESHOLD, "losses": self.losses}


def _score(cfg: CompareConfig, generator, tokenizer, groups) -> dict:
    start = time.perf_counter()
    opts = dataclasses.replace(cfg, batch_size=cfg.eval_batch_size or cfg.batch_size)
    texts = generate_texts(generator, tokenizer, [ex for ex, _ in groups], opts, prefix="default")
    metrics = evaluate.scores(split_list(cfg.metrics), texts, [refs for _, refs in groups])
    samples = [{"prompt": ex.prompt, "generation": t, "references": refs[:3]}
               for (ex, refs), t in zip(groups, texts)]
    return {"metrics": metrics, "eval_prompts": len(groups), "eval_seconds": time.perf_counter() - start,
            "samples": samples}


def _score_sets(cfg: CompareConfig, generator, tokenizer, groups) -> dict:
    """The scores on ``groups``, or with ``--eval-sets`` on each named set: the first set's are the row's
    own (what the table shows), and every set's are under ``sets``."""
    sets = held_out_sets(cfg)
    if sets is None:
        return _score(cfg, generator, tokenizer, groups)
    results = {name: _score(cfg, generator, tokenizer, picked) for name, picked in sets.items()}
    return {**next(iter(results.values())), "sets": results}


def held_out_sets(cfg: CompareConfig) -> dict[str, list] | None:
    """``--eval-sets``: each set's evaluation groups ``(first example, references)``; ``None`` without it."""
    if not cfg.eval_sets:
        return None
    if not cfg.eval_data:
        raise ValueError("--eval-sets needs --eval-data: the rows its filters pick from")
    return {name: _pick(data.group_references(data.load_examples(cfg.eval_data, **cfg.source_fields(),
                                                                 limit=cfg.eval_limit, keep=keep)), cfg)
            for name, keep in filters.sets(cfg.eval_sets, "eval_sets").items()}


def _pick(groups: list, cfg: CompareConfig) -> list:
    """The evaluation inputs scored: the first ``eval_prompts``, or ``eval_sample`` drawn at random with
    seed 0 whatever ``--seed`` (every method and seed is scored on the same inputs), kept in file order."""
    if not cfg.eval_sample or cfg.eval_sample >= len(groups):
        return groups[:cfg.eval_sample or cfg.eval_prompts]
    drawn = sorted(random.Random(0).sample(range(len(groups)), cfg.eval_sample))
    return [groups[i] for i in drawn]


def examples(cfg: CompareConfig) -> tuple[list, list]:
    """The training examples and the evaluation groups ``(first example, references)``."""
    from .. import demo

    train_where, eval_where = filters.parsed(cfg.train_where, "train_where"), filters.parsed(cfg.eval_where, "eval_where")
    if cfg.data is None:
        train_examples, held_out = demo.train_and_held_out(cfg.seed)
        train_examples = data.select(train_examples, train_where, "demo")
        train_examples = train_examples[:cfg.train_limit] if cfg.train_limit else train_examples
        held_out = data.select(held_out, eval_where, "demo")
    else:
        train_examples = data.load_examples(cfg.data, **cfg.source_fields(), limit=cfg.train_limit, keep=train_where)
        held_out = None
    if cfg.train_sample:
        if cfg.train_sample > len(train_examples):
            raise ValueError(f"--train-sample {cfg.train_sample}: only {len(train_examples)} training examples")
        train_examples = random.Random(cfg.seed).sample(train_examples, cfg.train_sample)
    if cfg.eval_data:
        held_out = data.load_examples(cfg.eval_data, **cfg.source_fields(), limit=cfg.eval_limit, keep=eval_where)
    if not held_out:
        raise ValueError("--eval-data is required with --data: the held-out examples to score")
    return train_examples, _pick(data.group_references(held_out), cfg)


class PeakMemory:
    """Peak memory over a ``with`` block: CUDA allocator peak, or sampled resident set size on CPU."""

    def __init__(self, device: torch.device, every: float = 0.005):
        self.device, self.every = device, every
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline = self.peak = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.every)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    def result(self) -> dict:
        kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "process RSS, sampled every 5 ms"
        return {"peak_memory_mib": self.peak / 2**20, "memory_increase_mib": (self.peak - self.baseline) / 2**20,
                "memory_kind": kind}


def rss_bytes() -> int:
    """This process's resident set size now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best the standard library offers
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------------- isolation
def run_isolated(cfg: CompareConfig, name: str, lr: float, out: Path) -> dict:
    """``run_method`` in a fresh Python process (its own peak memory; a crash costs one row). The worker
    shares this process's terminal, so its progress shows as it goes."""
    out.mkdir(parents=True, exist_ok=True)
    spec, result = out / "spec.json", out / "row.json"
    spec.write_text(json.dumps({"config": dataclasses.asdict(cfg), "method": name, "lr": lr, "out": str(out)}))
    result.unlink(missing_ok=True)
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    code = subprocess.call([sys.executable, "-m", "prefixtune.compare.runner", str(spec), str(result)], env=env)
    if result.is_file():
        return json.loads(result.read_text(encoding="utf-8"))
    return {"method": name, "label": METHODS[name].label, "lr": lr, "status": "failed",
            "reason": f"worker process died (exit code {code}; its output is above)", "notes": []}


def _worker(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    cfg = CompareConfig(**spec["config"])
    _quiet()
    row = run_method(cfg, spec["method"], spec["lr"], Path(spec["out"]))
    Path(result_path).write_text(json.dumps(row, indent=1), encoding="utf-8")
    return 0


def _quiet() -> None:
    import logging
    import warnings

    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)


# ------------------------------------------------------------------------------- helpers
def _unavailable(method: Method, cfg: CompareConfig, device) -> str | None:
    import importlib.util

    missing = [p for p in method.needs if importlib.util.find_spec(p) is None]
    if missing:
        return f"needs {', '.join(missing)} (pip install 'prefixtune[compare]')"
    return method.unavailable(cfg, device)


def _count(model) -> int:
    return _count_list(list(model.parameters()))


def _count_list(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        packed = getattr(p, "quant_state", None) is not None  # bitsandbytes 4-bit: two weights per byte
        total += p.numel() * (2 if packed else 1)
    return total


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())




if __name__ == "__main__":
    sys.exit(_worker(*sys.argv[1:3]))
