"""The training loop end to end on a tiny model: outputs, resume after a kill, the NaN
guard, early stopping, accumulation invariance, and the command line around it."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefixtune import options
from prefixtune.cli import main
from prefixtune.config import TrainConfig
from prefixtune.train import TrainingError, train


def _cfg(model_dir, data_files, out, **kw):
    base = dict(model=model_dir, data=str(data_files / "train.jsonl"), eval_data=str(data_files / "eval.jsonl"),
                output_dir=str(out), prefix_length=3, reparam_hidden_size=16, batch_size=4, max_steps=6,
                lr=1e-2, metrics="bleu", max_new_tokens=6, save_every=2, max_length=64)
    return options.from_flat(TrainConfig, {**base, **kw})


def _prefix(out):
    return load_file(str(Path(out) / "prefix.safetensors"))["key_values"]


def test_train_writes_prefix_metrics_curves_and_replayable_config(model_dir, data_files, tmp_path):
    result = train(_cfg(model_dir, data_files, tmp_path / "run", eval_every=3))
    out = tmp_path / "run"
    for name in ("prefix_config.json", "prefix.safetensors", "metrics.jsonl", "curves.png", "config.yaml", "eval.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] >= 0 for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval" in r] == [3, 6]
    assert set(result["scores"]) == {"base model", "with prefix"}
    assert "bleu" in result["scores"]["with prefix"]
    assert main(["train", "--config", str(out / "config.yaml"), "--output-dir", str(tmp_path / "replay")]) == 0
    torch.testing.assert_close(_prefix(tmp_path / "replay"), _prefix(out), atol=0, rtol=0)


def test_gradient_accumulation_does_not_change_the_update(model_dir, data_files, tmp_path):
    train(_cfg(model_dir, data_files, tmp_path / "whole", eval_data=None, max_steps=2))
    train(_cfg(model_dir, data_files, tmp_path / "split", eval_data=None, max_steps=2, micro_batch_size=1))
    torch.testing.assert_close(_prefix(tmp_path / "split"), _prefix(tmp_path / "whole"), atol=1e-6, rtol=1e-4)


def test_nan_loss_stops_with_the_last_good_prefix_kept(model_dir, data_files, tmp_path):
    with pytest.raises(TrainingError, match=r"became (nan|inf).*last good prefix is in"):
        train(_cfg(model_dir, data_files, tmp_path / "nan", eval_data=None, lr=1e30, max_grad_norm=0,
                   max_steps=50))
    assert torch.isfinite(_prefix(tmp_path / "nan")).all()


def test_existing_checkpoint_is_never_overwritten_without_resume(model_dir, data_files, tmp_path):
    cfg = _cfg(model_dir, data_files, tmp_path / "run", eval_data=None, max_steps=2)
    train(cfg)
    with pytest.raises(TrainingError, match="already holds a training checkpoint: pass --resume"):
        train(cfg)
    with pytest.raises(TrainingError, match="--resume: no checkpoint"):
        train(_cfg(model_dir, data_files, tmp_path / "empty", resume=True))


def test_early_stopping_stops_after_patience(model_dir, data_files, tmp_path):
    train(_cfg(model_dir, data_files, tmp_path / "run", lr=0.0, max_steps=20, eval_every=1, patience=2))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-1] < 20


@pytest.mark.slow
def test_killed_at_random_moments_and_resumed_a_run_ends_bit_identical_to_an_uninterrupted_one(model_dir, data_files,
                                                                                               tmp_path):
    """SIGKILL six times at random moments of training (a checkpoint is written after every step, so
    kills land inside checkpoint writes too), each time continuing with --resume (or afresh, if no
    checkpoint was written yet): the final prefix and the log equal an uninterrupted run's exactly."""
    args = ["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--prefix-length", "3",
            "--reparam-hidden-size", "16", "--batch-size", "4", "--max-steps", "60", "--save-every", "1",
            "--lr", "1e-2", "--max-length", "64"]
    assert main(args + ["--output-dir", str(tmp_path / "straight")]) == 0
    killed, rng = tmp_path / "killed", random.Random(0)
    log = killed / "metrics.jsonl"
    kills = 0
    def resume():
        return ["--resume"] if (killed / "checkpoint").exists() or (killed / ".checkpoint.old").exists() else []

    while kills < 6:
        proc = subprocess.Popen([sys.executable, "-m", "prefixtune.cli", *args, "--output-dir", str(killed), *resume()],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        lines = len(log.read_text().splitlines()) if log.is_file() else 0
        deadline = time.time() + 120  # wait for this process to train a step, then kill it a moment later
        while proc.poll() is None and time.time() < deadline and (
                not log.is_file() or len(log.read_text().splitlines()) <= lines):
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is not None:
            break  # it finished first: nothing left to kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills >= 3, "the run finished before it could be killed often enough"
    assert main(args + ["--output-dir", str(killed), *resume()]) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert torch.equal(_prefix(killed), _prefix(tmp_path / "straight"))


def test_curves_draw_the_loss_the_rate_and_every_evaluation(model_dir, data_files, tmp_path):
    from prefixtune import curves

    train(_cfg(model_dir, data_files, tmp_path / "run", max_steps=6, eval_every=2, metrics="bleu"))
    drawn = curves.plot(tmp_path / "run" / "metrics.jsonl", tmp_path / "curves.png")
    steps, raw = drawn["training loss"]["lines"]["each step"]
    assert steps == [1, 2, 3, 4, 5, 6] and len(drawn["training loss"]["lines"]["moving average"][1]) == 6
    assert drawn["learning rate"]["lines"]["learning rate"][0] == steps
    evaluation = drawn["evaluation"]["lines"]
    assert evaluation["loss"][0] == [2, 4, 6] and len(evaluation["bleu"][1]) == 3  # the final one at step 6 too
    assert drawn["evaluation"]["text"] == []


def test_a_run_evaluated_once_shows_its_scores_as_numbers(tmp_path):
    from prefixtune import curves

    rows = [{"step": 1, "loss": 2.0, "lr": 1e-3}, {"step": 2, "loss": 1.5, "lr": 5e-4},
            {"step": 2, "eval": {"loss": 1.25, "perplexity": 3.49, "bleu": 42.5}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = curves.plot(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert drawn["evaluation"]["lines"] == {}
    assert drawn["evaluation"]["text"] == ["at step 2\nloss: 1.25\nbleu: 42.5"]
    assert curves.smoothed([2.0, 1.0]) == [2.0, pytest.approx((0.9 * 0.1 * 2.0 + 0.1 * 1.0) / (1 - 0.81))]


def test_metrics_go_to_tensorboard_when_it_is_installed(model_dir, data_files, tmp_path, monkeypatch):
    import types

    class Writer:
        scalars: list = []

        def __init__(self, log_dir):
            assert log_dir.endswith("tensorboard")

        def add_scalar(self, key, value, step):
            self.scalars.append((key, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(_cfg(model_dir, data_files, tmp_path / "run", max_steps=2, metrics="bleu", metric="loss"))
    assert {("train/loss", 1), ("train/loss", 2), ("train/tokens_per_s", 2), ("eval/loss", 2)} <= set(Writer.scalars)


def test_training_takes_the_loss_without_the_full_logits(model_dir, data_files, tmp_path, monkeypatch):
    from prefixtune import lm_loss

    calls = []
    original = lm_loss.causal_lm_loss
    monkeypatch.setattr(lm_loss, "causal_lm_loss", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    train(_cfg(model_dir, data_files, tmp_path / "run", eval_data=None, max_steps=2))
    assert len(calls) == 2 and all(len(shape) == 3 for shape in calls)  # one micro-batch per step


def test_gradient_checkpointing_and_bf16_autocast_train(model_dir, data_files, tmp_path):
    train(_cfg(model_dir, data_files, tmp_path / "run", eval_data=None, max_steps=2, gradient_checkpointing=True,
               precision="bf16"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert torch.isfinite(_prefix(tmp_path / "run")).all()


def test_fp16_without_cuda_is_refused_before_training(model_dir, data_files, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where fp16 autocast is allowed")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(_cfg(model_dir, data_files, tmp_path / "run", eval_data=None, max_steps=1, precision="fp16"))


def test_ctrl_c_writes_a_checkpoint_that_resume_continues(model_dir, data_files, tmp_path):
    def ctrl_c_after_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    cfg = _cfg(model_dir, data_files, tmp_path / "run", eval_data=None, max_steps=6, save_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[ctrl_c_after_step_3])
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["state"]
    assert state["step"] == 3, "the three finished steps are kept, though --save-every 0 wrote none"
    train(_cfg(model_dir, data_files, tmp_path / "run", eval_data=None, max_steps=6, save_every=0, resume=True))
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resume: false" in (tmp_path / "run" / "config.yaml").read_text(), "a replayed config starts afresh"
