"""The training loop end to end on a tiny model: outputs, resume after a kill, the NaN
guard, early stopping, accumulation invariance, and the command line around it."""

import json
import math
import os
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
def test_resume_after_a_killed_run_ends_where_an_uninterrupted_run_ends(model_dir, data_files, tmp_path):
    args = ["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), "--prefix-length", "3",
            "--reparam-hidden-size", "16", "--batch-size", "4", "--max-steps", "120", "--save-every", "5",
            "--lr", "1e-2", "--max-length", "64"]
    assert main(args + ["--output-dir", str(tmp_path / "straight")]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "prefixtune.cli", *args, "--output-dir", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["state"]["step"] >= 10):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = json.loads(state.read_text())["state"]["step"]
    assert 10 <= stopped_at < 120, "the run should have been killed midway"
    assert main(args + ["--output-dir", str(killed), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121))
    torch.testing.assert_close(_prefix(killed), _prefix(tmp_path / "straight"), atol=1e-6, rtol=1e-5)


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
