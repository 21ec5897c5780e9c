"""Training: one step function and one loop, shared by ``prefixtune train`` and ``prefixtune compare``.

:meth:`Stepper.step` is one AdamW step over a global batch: micro-batches whose losses are
normalised by the token count of the whole global batch (so the update does not depend on how
the batch is split), optional autocast, the gradient reduced across processes, clipped, and
checked for NaN/inf. :meth:`Stepper.run` runs the steps of a run in the data order of
:class:`prefixtune.data.BatchOrder` and tells a :class:`Hooks` object before and after each
one: ``prefixtune train`` (:class:`TrainingRun`) evaluates, keeps the best prefix, logs and writes
atomic checkpoints there; ``compare`` measures time, tokens and memory.

Under ``accelerate launch`` or ``torchrun`` the same loop trains data-parallel: each process
takes its share of every global batch, and only the main process writes files
(:mod:`prefixtune.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import artifacts, checkpoint, curves, data, demo, distributed, evaluate, options, progress, recipe, runtime, spikes
from .base_models import class_names, load_model
from .config import StepOptions, TrainConfig
from .data import filters
from .metrics import check_available, lower_is_better
from .model import PrefixModel
from .runtime import autocast, pick_device
from .schedule import optimizer_for

log = logging.getLogger("prefixtune")


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (diverged, nothing to resume...)."""


class Diverged(TrainingError):
    """A step's loss or gradient norm was NaN or infinite; nothing was updated."""


LossFn = Callable[[dict, torch.Tensor], torch.Tensor]
"""``loss_of(batch, items)``: a micro-batch's summed loss divided by ``items``, the number of
labelled tokens (or rows) in the whole global batch."""


@dataclasses.dataclass
class Stepper:
    """What every optimizer step of a run shares: the loss, what trains, the optimizer and its schedule,
    and where and how the step runs (:meth:`step` is one step, :meth:`run` the steps of a run)."""

    loss_of: LossFn
    params: list
    pad_id: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    options: StepOptions
    device: torch.device
    micro_batch_size: int | None = None
    dist: object = distributed.LOCAL
    """This process's place among the processes (:mod:`prefixtune.distributed`; ``LOCAL`` alone)."""

    def step(self, rows: list[dict]) -> tuple[float, int]:
        """One optimizer step over the global batch ``rows``; returns its (loss, input tokens).

        This process's micro-batches of it (all of it, alone) each add their summed token loss over
        the label count of the whole global batch, so that the summed gradient is the global batch's
        mean-token-loss gradient however the batch is split into micro-batches and processes.

        Raises:
            Diverged: the loss or the gradient norm is not finite (checked after the reduction across
                processes, so every process stops together); the gradients are cleared, nothing updated.
        """
        device, dist = self.device, self.dist
        batches = [(data.collate(part, self.pad_id), weight) for part, weight in dist.plan(rows, self.micro_batch_size)]
        items = sum(_loss_items(b["labels"]) for b, weight in batches if weight)
        items = dist.sum(torch.tensor(items, device=device)).clamp_min(1)
        total, tokens = torch.zeros((), device=device), 0
        for batch, weight in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(self.options.precision, device):
                loss = self.loss_of(batch, items)
            (loss if weight else loss * 0.0).backward()  # weight 0: a padding pass, for FSDP's collectives
            if weight:
                total += loss.detach().float()
                tokens += int(batch["attention_mask"].sum())
        total, tokens = dist.reduce_gradients(self.params, total, torch.tensor(float(tokens), device=device))
        _check_finite(total, "loss", self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm or float("inf"))
        _check_finite(norm, "gradient norm", self.optimizer)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item(), int(tokens)

    def run(self, order: data.BatchOrder, start: int, total: int, hooks: "Hooks") -> None:
        """Steps ``start`` to ``total`` of a run, each :meth:`step` over the rows ``order`` gives it."""
        for step in range(start, total):
            if hooks.stop():
                return
            hooks.before_step(step)
            begin = time.perf_counter()
            loss, tokens = self.step(order[step])
            hooks.after_step(step + 1, loss, tokens, time.perf_counter() - begin)


def _check_finite(value: torch.Tensor, what: str, optimizer) -> None:
    if not torch.isfinite(value).all():
        optimizer.zero_grad(set_to_none=True)
        raise Diverged(f"{what} became {value.item()}")


class Hooks:
    """What a run does around its steps (:meth:`Stepper.run` calls these); each does nothing here."""

    def stop(self) -> bool:
        """Whether to stop before the next step (early stopping)."""
        return False

    def before_step(self, step: int) -> None:
        """Called before step ``step`` (counted from 0)."""

    def after_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        """Called after step ``step`` (counted from 1: the steps done) with its loss, input tokens and time."""


@dataclasses.dataclass
class TrainState:
    """Where a run stands: what a checkpoint saves and a resumed run starts from."""

    step: int = 0
    """Optimizer steps done."""
    best: float | None = None
    """The best evaluation of ``--metric`` so far."""
    best_step: int | None = None
    """The step of that evaluation (its prefix is the one in the output folder)."""
    bad_evals: int = 0
    """Evaluations in a row that did not improve on ``best`` (early stopping counts them)."""


def language_model_loss(model, pm: PrefixModel, batch: dict, items: torch.Tensor, full_logits: bool = False):
    """``model``'s language-model loss of ``batch`` summed over ``items`` tokens (:data:`LossFn`).

    ``model`` is ``pm`` itself or what wraps it for the forward (FSDP); the loss is computed
    without the full logits (``prefixtune.lm_loss``) unless ``full_logits`` (a sharded LM head)."""
    return model(**causal_batch(pm, batch), num_items_in_batch=items, return_logits=full_logits).loss


def train(cfg: TrainConfig, callbacks: list[Callable[[int, float], None]] = ()) -> dict:
    """Run training as ``cfg`` says; returns the final evaluation (and where things were written).

    Args:
        cfg: The run.
        callbacks: Each is called with ``(step, loss)`` after every optimizer step.
    """
    _validate(cfg)
    if cfg.lr is None:  # the rate the prefix takes (prefixtune.recipe), from here on as if given: config.yaml
        log.info(recipe.describe(cfg.prefix_config))  # records it, and --resume compares with it
        cfg = dataclasses.replace(cfg, lr=cfg.learning_rate())
    out = Path(cfg.output_dir)
    resume_from = _resume_point(cfg, out)
    dist = distributed.setup(cfg.device)
    torch.manual_seed(cfg.seed)
    device = dist.device if isinstance(dist, distributed.Processes) else pick_device(cfg.device)
    autocast(cfg.precision, device)  # refuses now, not at step 1, what the device cannot do
    train_examples, eval_examples = _examples(cfg)
    saved_state = None
    if resume_from:  # before the model loads: the steps come from the data, one row per example
        saved_state = _resumable_state(resume_from, total_steps(cfg, len(train_examples)))
    labels = data.label_names(train_examples) if cfg.task == "classification" else None
    model, tokenizer = load_model(cfg.model, task=cfg.task, labels=labels, attn_implementation=cfg.attn_implementation)
    model.to(device)
    rows = _tokenize(train_examples, tokenizer, cfg, labels)
    prefix_config = cfg.prefix_config
    if resume_from:  # the checkpoint holds the prefix: no text to fit it to
        prefix_config = prefix_config.replace(init="random", init_text=None)
    with dist.whole_base(model) if prefix_config.init == "text" else contextlib.nullcontext():
        pm = PrefixModel.wrap(model, prefix_config, tokenizer=tokenizer)  # --init-text runs the base once
    if resume_from:
        pm.load_prefix(resume_from)
    if cfg.gradient_checkpointing:
        pm.activation_checkpointing_enable()
    if device.type == "cpu":
        _check_training_fits(pm)
    total = total_steps(cfg, len(rows))
    optimizer, scheduler = optimizer_for(pm.parameter_groups(), cfg.lr, cfg, total)
    runner = dist.prepare(pm, optimizer)  # what forward passes call: `pm`, or the FSDP-sharded model around it;
    # under DeepSpeed ZeRO-3 `pm` itself, its base partitioned
    state = TrainState()
    if resume_from:
        state = TrainState(**saved_state)
        checkpoint.restore(resume_from, optimizer, scheduler, rng=not isinstance(dist, distributed.Processes))
        log.info("resumed from %s at step %d of %d", resume_from, state.step, total)
    dist.seed(cfg.seed, state.step)
    if dist.is_main:
        _make_folder(out)
        _forget_after(out / "metrics.jsonl", state.step)  # a fresh run starts a fresh log
        options.dump(dataclasses.replace(cfg, resume=False), out / "config.yaml", CONFIG_HEADER)  # a replay starts afresh
    run = TrainingRun(RunContext(cfg, pm, runner, tokenizer, out, dist), (optimizer, scheduler), (rows, eval_examples),
                      state, total, callbacks)
    run.train()
    result = run.finish()
    dist.close()
    return result


@dataclasses.dataclass
class RunContext:
    """What a ``prefixtune train`` run works with: its options, the model, where it writes, and its place
    among the processes."""

    cfg: TrainConfig
    pm: PrefixModel
    """The PrefixModel: its prefix is what trains and is saved."""
    runner: object
    """What forward passes call: ``pm`` itself, or the FSDP-sharded model around it."""
    tokenizer: object
    out: Path
    dist: object = distributed.LOCAL
    """This process's place among the processes (:mod:`prefixtune.distributed`; ``LOCAL`` alone)."""


class TrainingRun(Hooks):
    """One ``prefixtune train`` run and what it does around each step (the :class:`Hooks`).

    Args:
        context: The options, model and output folder.
        schedule: The optimizer and its learning-rate schedule.
        examples: The tokenized training rows and the held-out examples.
        state: Where the run stands (a fresh one, or the checkpoint's).
        total: The run's optimizer steps.
        callbacks: Each is called with ``(step, loss)`` after every step.
    """

    def __init__(self, context: RunContext, schedule: tuple, examples: tuple[list, list], state: TrainState,
                 total: int, callbacks=()):
        self.cfg, self.pm, self.runner, self.tokenizer = context.cfg, context.pm, context.runner, context.tokenizer
        self.out, self.dist = context.out, context.dist
        self.optimizer, self.scheduler = schedule
        (self.rows, self.eval_examples), self.state, self.total = examples, state, total
        self.stepper = Stepper(self._loss, self.pm.trainable_parameters(), self.tokenizer.pad_token_id, self.optimizer,
                               self.scheduler, self.cfg, self.pm.device, self.cfg.micro_batch_size, self.dist)
        self.callbacks = list(callbacks)
        cfg = self.cfg
        self.labels = class_names(self.pm.model) if cfg.task == "classification" else None  # classes, by id
        # a classifier is scored on token rows with class ids; a language model on the examples themselves
        self.eval_rows = _tokenize(self.eval_examples, self.tokenizer, cfg, self.labels) if self.labels else None
        self.order = data.BatchOrder(self.rows, cfg.batch_size, cfg.seed)
        self.metrics_file = self.out / "metrics.jsonl"
        self._before: list | None = None  # what trains, as it was before the step in progress
        self._last_good: list | None = None  # what trains, as it was before the last step that succeeded
        self.tensorboard = _tensorboard(self.out) if self.dist.is_main else None
        self.spikes = spikes.SpikeWatch(cfg.warmup_steps)  # a resumed run starts its window afresh
        self.bar = None

    def train(self) -> None:
        self.bar = progress.bar(self.total, "train", unit="step", initial=self.state.step, enabled=self.dist.is_main)
        try:
            self.stepper.run(self.order, self.state.step, self.total, self)
        except Diverged as err:
            self._keep_last_good()
            raise TrainingError(f"{err} at step {self.state.step + 1}; training stopped. The last good prefix "
                                f"is in {self.out} (try a lower --lr, --max-grad-norm, or --precision fp32)") from None
        except KeyboardInterrupt:
            self._checkpoint()
            log.warning("interrupted: checkpoint at step %d in %s; continue with --resume", self.state.step,
                        self.out / "checkpoint")
            raise
        finally:
            self.bar.close()
        self._checkpoint()

    # ------------------------------------------------------------------ hooks
    def stop(self) -> bool:
        patience = self.cfg.patience
        if patience and self.state.bad_evals >= patience:
            log.warning("early stopping: %s did not improve for %d evaluations", self.cfg.metric, patience)
            return True
        return False

    def before_step(self, step: int) -> None:
        self.runner.train()  # evaluation left it in eval mode
        self._before = [p.detach().clone() for p in self.pm.trainable_parameters()]

    def after_step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        self.state.step, self._last_good = step, self._before
        lr, rate = self.scheduler.get_last_lr()[0], tokens / seconds
        self._record({"step": step, "loss": loss, "lr": lr, "tokens_per_s": rate,
                      "epoch": (step - 1) // self.order.per_epoch})
        self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        self.bar.update()
        self._warn_of_spike(step, loss)
        every = self.cfg.evaluations_every()
        if self.eval_examples and every and step % every == 0 and step < self.total:
            self._evaluate()
        if self.cfg.save_every and step % self.cfg.save_every == 0:
            self._checkpoint()
        for callback in self.callbacks:
            callback(step, loss)

    def _warn_of_spike(self, step: int, loss: float) -> None:
        """One line where the step's loss is a spike (:mod:`prefixtune.spikes`); training goes on."""
        ratio = self.spikes.add(step, loss)
        if ratio is not None and ratio > spikes.THRESHOLD and self.dist.is_main:
            progress.note(f"warning: loss spike at step {step}: {loss:.3f} is {ratio:.1f}x the median of the "
                          f"last {spikes.WINDOW} steps' losses (training goes on; a lower --lr or --max-grad-norm "
                          "may help)")

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: dict, items: torch.Tensor) -> torch.Tensor:
        """This micro-batch's summed loss over ``items``, the label count of the whole global batch."""
        if self.labels is None:
            return language_model_loss(self.runner, self.pm, batch, items, full_logits=self._sharded_head)
        logits = self.runner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum") / items

    @property
    def _sharded_head(self) -> bool:
        """Whether FSDP/ZeRO-3 shard the LM head: then only the model's own forward can gather it,
        and the loss needs the full logits; elsewhere it is computed without them (prefixtune.lm_loss)."""
        return self.dist.kind not in ("local", "ddp")

    def _keep_last_good(self) -> None:
        """After a divergence: what trains goes back to before the update that led there, and is saved
        (unless an evaluation already saved the best prefix)."""
        if self.state.best_step is not None:
            return
        if self._last_good is not None:
            with torch.no_grad():
                for param, good in zip(self.pm.trainable_parameters(), self._last_good):
                    param.copy_(good)
        if self.dist.is_main:
            self.pm.save_prefix(self.out)

    # ------------------------------------------------------------------ evaluation
    def _score(self, prefix: str | None, metrics: list[str], generate_limit: int | None = None) -> dict:
        """The evaluation of ``prefix`` on the held-out data: loss (+ perplexity), and ``metrics``
        for a language model; loss and accuracy for a classifier."""
        if self.labels is not None:
            result = evaluate.classify(self.pm, self.eval_rows, self.tokenizer.pad_token_id,
                                       batch_size=self.cfg.batch_size, prefix=prefix)
            result.pop("predictions")
            return result
        return evaluate.score(self.pm, self.tokenizer, self.eval_examples, self.cfg, prefix=prefix,
                              metrics=metrics, generate_limit=generate_limit, return_logits=self._sharded_head)

    def _evaluate(self) -> None:
        """Score the prefix on the held-out data (every metric, on at most ``eval_generate_limit``
        prompts), log it, and keep it where it is the best so far."""
        metric = self.cfg.metric
        names = [] if self.labels is not None else options.split_list(self.cfg.metrics)
        with self.dist.evaluation(self.runner):
            result = self._score("default", names, self.cfg.generate_limit())
        result.pop("generations", None)
        result = self.dist.broadcast(result)  # every process then takes the same best/patience decisions
        value = result[metric]
        best = self.state.best
        better = best is None or (value < best if lower_is_better(metric) else value > best)
        if better:
            self.state.best, self.state.best_step, self.state.bad_evals = value, self.state.step, 0
            if self.dist.is_main:
                self.pm.save_prefix(self.out)
        else:
            self.state.bad_evals += 1
        self._record({"step": self.state.step, "eval": result})
        if self.dist.is_main:
            progress.note(f"step {self.state.step}: eval {metric} {value:.4f}" + (" (best)" if better else ""))

    def _checkpoint(self) -> None:
        if self.dist.is_main:  # every process holds the same prefix and optimizer state
            checkpoint.save(self.out / "checkpoint", self.pm, self.optimizer, self.scheduler, dataclasses.asdict(self.state),
                            processes=self.dist.world_size)

    def _record(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            scalars = {f"eval/{k}": v for k, v in row.get("eval", {}).items()} or {
                f"train/{k}": v for k, v in row.items() if k != "step"}
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()

    def finish(self) -> dict:
        """Final evaluation of the base model and the best (or last) prefix; curves; summary."""
        if not self.eval_examples:
            if self.dist.is_main:
                self.pm.save_prefix(self.out)
            result = {"prefix": str(self.out)}
        else:
            self._evaluate()  # the final prefix competes with the best one
            result = self._final_scores()
        if self.dist.is_main:
            curves.plot(self.metrics_file, self.out / "curves.png")
        return result

    def _final_scores(self) -> dict:
        self.dist.barrier()  # the best prefix is on disk for every process
        self.pm.load_prefix(self.out, name="best")
        metrics = ["accuracy"] if self.labels is not None else options.split_list(self.cfg.metrics)
        with self.dist.evaluation(self.runner):
            scores = ({"majority class": _majority(self.rows, self.eval_rows), "with prefix": self._score("best", [])}
                      if self.labels is not None else
                      {label: self._score(prefix, metrics) for label, prefix in (("base model", None),
                                                                                 ("with prefix", "best"))})
        if not self.dist.is_main:
            return {"prefix": str(self.out), "scores": scores}
        (self.out / "eval.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
        print(f"\n{len(self.eval_examples)} held-out examples; best prefix from step {self.state.best_step}")
        print(evaluate.table(scores, metrics))
        samples = [scores[k]["generations"][0]["generation"] for k in scores] if self.labels is None and metrics else []
        for label, text in zip(scores, samples):
            print(f"{label:>12}: {text}")
        print(f"\nprefix, metrics.jsonl, curves.png, eval.json and config.yaml are in {self.out}")
        return {"prefix": str(self.out), "scores": scores}


def _resumable_state(checkpoint_dir: Path, total: int) -> dict:
    """The checkpoint's training state, unless it lies past the ``total`` steps of this run (``--max-steps``
    lowered): then it is refused."""
    state = checkpoint.load_state(checkpoint_dir)
    step = state["step"]
    if step > total:
        raise ValueError(f"--max-steps: the checkpoint in {checkpoint_dir} is at step {step}, past the {total} "
                         f"steps of this run; give more steps to go on from it")
    return state


def _check_training_fits(pm: PrefixModel) -> None:
    """Training holds three more float32 copies of what trains than the model does (gradients, AdamW's two
    moments): a run they cannot fit beside it is refused before its first step allocates them, where the
    out-of-memory killer would end it without a word."""
    count = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    needed, free = 3 * 4 * count, runtime.free_memory()
    if free and needed > free:
        raise TrainingError(f"--prefix-length / --reparam-hidden-size: training {count:,} parameters needs "
                            f"{needed / 2**30:,.1f} GiB more for their gradients and AdamW's two moments, more than the "
                            f"{free / 2**30:,.1f} GiB this machine has free")


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"--output-dir {out}: cannot create it ({err.strerror or err})") from None


def _forget_after(metrics_file: Path, step: int) -> None:
    """Drop the log rows of steps that the checkpoint does not include (they will be redone); a fresh run
    (step 0) drops them all."""
    if step == 0:
        metrics_file.unlink(missing_ok=True)
    elif metrics_file.is_file():
        kept = [line for number, line in enumerate(metrics_file.read_text(encoding="utf-8").splitlines(), start=1)
                if line.strip() and _logged_step(line, f"{metrics_file}:{number}") <= step]
        metrics_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _logged_step(line: str, where: str) -> int:
    """The step of one row of a run's log, or a TrainingError naming the row."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, RecursionError, TypeError, KeyError):
        step = None
    if type(step) is not int:
        raise TrainingError(f"{where}: not a row of a run's log (a JSON object with a whole-number 'step'); "
                            "the log is cut back to the checkpoint on --resume, so it must be one")
    return step


def _validate(cfg: TrainConfig) -> None:
    """What the config cannot check itself, before anything else is looked at: that the data files are there
    (a missing one is named even when the output folder would be refused too), and whether the metrics can run
    here (METEOR needs Java)."""
    for source in (cfg.data, cfg.eval_data):
        if source:
            data.check_source(source)
    if cfg.task != "classification":
        check_available(options.split_list(cfg.metrics))


def _resume_point(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from, or ``None`` for a fresh run into a folder that holds no earlier run:
    a fresh run never writes over a checkpoint or a prefix without ``--resume``."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output-dir {out}: is a file, not a folder")
    found = checkpoint.find(out / "checkpoint")
    if cfg.resume and found is None:
        raise TrainingError(f"--resume: no checkpoint in {out / 'checkpoint'}")
    if not cfg.resume and found is not None:
        raise TrainingError(f"--output-dir {out} already holds a training checkpoint: pass --resume to continue it, "
                            "or choose another --output-dir")
    if not cfg.resume and (out / artifacts.WEIGHTS_FILE).exists():
        raise TrainingError(f"--output-dir {out} already holds a prefix ({artifacts.WEIGHTS_FILE}) and no checkpoint to "
                            "resume: choose another --output-dir, or remove the folder to train afresh")
    if cfg.resume:
        _check_same_run(cfg, out / "config.yaml")
    else:
        _refuse_files_of_no_run(out)
    return found if cfg.resume else None


CONFIG_HEADER = "# prefixtune train: the options of the run in this folder; replay it with --config FILE\n"
"""The first line of the ``config.yaml`` a run writes: what tells a run's own files from a user's."""

RUN_FILES = ("config.yaml", "metrics.jsonl", "curves.png", "eval.json")
"""The files a run writes into its folder besides the prefix and its checkpoint."""


def _refuse_files_of_no_run(out: Path) -> None:
    """A fresh run writes :data:`RUN_FILES` over what its folder holds. It may replace what a run left there
    (one killed before its first checkpoint starts again in its own folder), never a user's own files: a run's
    ``config.yaml`` begins with :data:`CONFIG_HEADER`, and the other files are a run's only beside one."""
    config = out / "config.yaml"
    if config.is_file():
        with open(config, "rb") as f:
            if f.read(len(CONFIG_HEADER)) == CONFIG_HEADER.encode():
                return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found:
        them = "it" if len(found) == 1 else "them"
        raise TrainingError(f"--output-dir {out} holds {', '.join(found)}, not written there by a prefixtune run (a "
                            f"run's config.yaml begins {CONFIG_HEADER.split(':')[0]!r}); a run would replace {them}: "
                            f"choose another --output-dir, or move {them} away")


RESUME_CHANGES = ("resume", "output_dir", "max_steps", "epochs", "save_every", "eval_every", "eval_generate_limit",
                  "patience", "device")
"""Options a resumed run may change: how long it goes on, how often it saves and evaluates, where it runs
and where its folder is.
They are applied, and config.yaml records them; any other change is refused, naming the option."""


def _check_same_run(cfg: TrainConfig, saved: Path) -> None:
    """Refuse to resume with options that would make it another run than the one in ``saved``."""
    if not saved.is_file():
        return
    before = options.to_flat(options.build(TrainConfig, {}, str(saved)))
    now = options.to_flat(cfg)
    for name in now:
        if name not in RESUME_CHANGES and now[name] != before[name]:
            raise TrainingError(f"--resume: {'--' + name.replace('_', '-')} is {now[name]!r} here but "
                                f"{before[name]!r} in the run being resumed ({saved}); drop it to continue that "
                                "run, or train into another --output-dir")


def _examples(cfg: TrainConfig) -> tuple[list, list]:
    train_where, eval_where = filters.parsed(cfg.train_where, "train_where"), filters.parsed(cfg.eval_where, "eval_where")
    if cfg.data is None:
        train_examples, held_out = demo.train_and_held_out(cfg.seed)
        train_examples = data.select(train_examples, train_where, "demo")
        held_out = data.select(held_out, eval_where, "demo") if not cfg.eval_data else held_out
        log.info("no --data: training on the built-in demo task (%d examples)", len(train_examples))
    else:
        train_examples = data.load_examples(cfg.data, **cfg.source_fields(), limit=cfg.train_limit, keep=train_where)
        held_out = []
    if cfg.eval_data:
        held_out = data.load_examples(cfg.eval_data, **cfg.source_fields(), limit=cfg.eval_limit, keep=eval_where)
    return train_examples, held_out


def _tokenize(examples: list, tokenizer, cfg: TrainConfig, labels: list[str] | None = None) -> list[dict]:
    if labels is not None:
        rows, report = data.tokenize_classes(examples, tokenizer, labels, max_length=cfg.max_length)
    else:
        rows, report = data.tokenize(examples, tokenizer, max_length=cfg.max_length, template=cfg.prompt_template,
                                     chat_template=cfg.chat_template, overflow=cfg.overflow)
    if report["truncated"]:
        log.warning("%d of %d examples were longer than --max-length %d and were truncated (first: %s)",
                    len(report["truncated"]), len(rows), cfg.max_length, report["truncated"][0])
    return rows


def causal_batch(pm: PrefixModel, batch: dict) -> dict:
    """``batch`` (right-padded by :func:`data.collate`, label -100 on the padding) without its
    attention mask, where the mask cannot change the loss: a decoder-only language model.

    Under causal attention a real token sees only the tokens before it, never the padding after
    it, and the padding's own outputs carry no label; its positions (``0..n-1``) are the same
    with or without the mask. The loss and the gradients are the same (``tests/test_gradients.py``),
    but a call without a mask reaches the mask-free attention kernels: on a GPU, a mask keeps
    SDPA off flash attention and makes transformers copy the keys and values for every query
    head. Kept where the mask matters: an encoder (bidirectional), a task head, a mixture of
    experts whose load-balancing loss counts the tokens the mask marks."""
    config = pm.model.config
    if not pm.decoder_only or pm.heads or getattr(config, "output_router_logits", False):
        return batch
    return {**batch, "attention_mask": None}


def _loss_items(labels: torch.Tensor) -> int:
    """What a loss is averaged over: rows of a classifier (labels ``[B]``), else labelled next tokens."""
    return labels.numel() if labels.dim() == 1 else int((labels[:, 1:] != -100).sum())


def _majority(train_rows: list[dict], eval_rows: list[dict]) -> dict:
    """Accuracy of always answering the training set's most frequent class: the floor a classifier must clear."""
    counts: dict[int, int] = {}
    for row in train_rows:
        counts[row["labels"]] = counts.get(row["labels"], 0) + 1
    top = max(counts, key=counts.get)
    return {"loss": float("nan"), "accuracy": 100.0 * sum(r["labels"] == top for r in eval_rows) / max(len(eval_rows), 1)}


def total_steps(cfg: TrainConfig, examples: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` passes of global batches."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(examples / cfg.batch_size)))


def _tensorboard(out: Path):
    """A TensorBoard writer into ``OUT/tensorboard`` when the ``tensorboard`` package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))
