"""The loss-spike check (prefixtune.spikes) and the warning ``prefixtune train`` prints at a spike."""

import pytest

from prefixtune import options, spikes
from prefixtune import train as training
from prefixtune.config import TrainConfig


def test_a_spike_is_a_loss_over_twice_the_running_median_after_warmup():
    flat = [4.0, 3.0, 2.5, 2.2, 2.0, 1.9, 1.8, 1.7]
    assert not spikes.has_spike(flat, warmup_steps=2)
    spiked = flat[:6] + [5.0] + flat[6:]  # step 7: 5.0 over the median of steps 1-6 (2.35)
    assert spikes.ratios(spiked, warmup_steps=2)[6] == pytest.approx(5.0 / 2.35)
    assert spikes.has_spike(spiked, warmup_steps=2)
    assert spikes.largest_ratio(spiked, warmup_steps=2) == pytest.approx(5.0 / 2.35)
    assert not spikes.has_spike(flat[:6] + [4.5] + flat[6:], warmup_steps=2)  # 1.9x the median: not yet
    assert not spikes.has_spike(spiked, warmup_steps=7)  # during warmup the rate still rises: not checked


def test_early_steps_and_short_runs_are_not_checked():
    # fewer than MIN_HISTORY losses before a step: no ratio, whatever the loss
    assert spikes.ratios([1.0, 9.0, 9.0, 9.0, 9.0], warmup_steps=0) == [None] * 5
    assert spikes.largest_ratio([1.0, 9.0], warmup_steps=0) is None and not spikes.has_spike([1.0, 9.0], 0)


def test_the_median_looks_back_over_the_window_only():
    # a high start then WINDOW low steps: the high start has left the window, so 2.5 is a spike against 1.0
    losses = [10.0] * 5 + [1.0] * spikes.WINDOW + [2.5]
    assert spikes.ratios(losses, warmup_steps=0)[-1] == pytest.approx(2.5)
    # one earlier spike does not raise the bar for the next (a median, not a mean)
    losses = [1.0] * 10 + [50.0] + [1.0] * 5 + [2.5]
    assert spikes.ratios(losses, warmup_steps=0)[-1] == pytest.approx(2.5)


def test_train_warns_at_a_spike_and_goes_on(model_dir, data_files, tmp_path, monkeypatch, capsys):
    real = training.Stepper.step
    calls = []

    def step_with_a_spike(self, rows):  # the real step; its loss reported x10 at step 8
        loss, tokens = real(self, rows)
        calls.append(loss)
        return (loss * 10 if len(calls) == 8 else loss), tokens

    monkeypatch.setattr(training.Stepper, "step", step_with_a_spike)
    cfg = options.from_flat(TrainConfig, dict(model=model_dir, data=str(data_files / "train.jsonl"),
                                              output_dir=str(tmp_path / "run"), prefix_length=3, reparam_hidden_size=16,
                                              batch_size=4, max_steps=10, warmup_steps=2, lr=1e-3, save_every=0))
    training.train(cfg)
    err = capsys.readouterr().err
    assert err.count("loss spike") == 1 and "warning: loss spike at step 8:" in err
    assert len(calls) == 10 and (tmp_path / "run" / "prefix.safetensors").is_file()
