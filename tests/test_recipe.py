"""``prefixtune train``'s default recipe: the rate rule of ``prefixtune.recipe``, that the defaults are
the recipe study's chosen arm, and that a run records (and resumes at) the rate it used."""

import yaml

from benchmarks.recipe_study import ARMS, CHOSEN
from prefixtune import options
from prefixtune.compare.config import CompareConfig
from prefixtune.compare.methods import METHODS
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.recipe import RATES, default_lr, parameterization
from prefixtune.train import train


def test_the_default_rate_follows_how_the_prefix_is_built():
    cases = [(PrefixConfig(), "mlp-width", 3e-2), (PrefixConfig(reparameterize=False), "flat", 3e-2),
             (PrefixConfig(reparam_lr="same"), "mlp-same", 1e-3), (PrefixConfig(kind="memory"), "memory", 1e-2),
             (PrefixConfig(kind="memory", reparameterize=False), "memory", 1e-2)]
    for prefix, row, rate in cases:
        assert (parameterization(prefix), default_lr(prefix)) == (row, rate)
        assert TrainConfig(prefix_config=prefix).learning_rate() == rate
        assert TrainConfig(prefix_config=prefix, lr=5e-4).learning_rate() == 5e-4  # --lr wins
    assert set(RATES) == {parameterization(p) for p, _, _ in cases}


def test_prefixtune_train_defaults_are_the_arm_the_recipe_study_chose():
    """With nothing but ``--data``, ``prefixtune train`` runs what the study measured as its chosen arm:
    the same prefix as that arm's compare method builds, the same rate, clipping and warmup."""
    cfg = options.from_flat(TrainConfig, {"data": "train.jsonl"})
    arm, method = ARMS[CHOSEN], METHODS[ARMS[CHOSEN].method]
    assert method.name == "prefix-mup" and method.lr == arm.lr
    assert cfg.prefix_config == PrefixConfig(kind="kv", prefix_length=10, reparameterize=True, reparam_hidden_size=512,
                                             reparam_lr="width", init="random")
    assert cfg.learning_rate() == arm.lr == 3e-2
    assert (cfg.max_grad_norm, cfg.warmup_steps, cfg.batch_size) == (arm.max_grad_norm, arm.warmup, 8) == (0.0, 10, 8)
    assert cfg.schedule == "linear" and cfg.weight_decay == 0.0
    assert method.name in CompareConfig().methods.split(",")  # compare's default table shows it


def test_a_run_records_the_rate_it_used_and_resumes_at_it(model_dir, data_files, tmp_path, caplog):
    flat = dict(model=model_dir, data=str(data_files / "train.jsonl"), output_dir=str(tmp_path / "run"),
                prefix_length=3, reparam_hidden_size=16, batch_size=4, max_steps=2, save_every=1, max_length=64,
                prefix_kind="memory")
    with caplog.at_level("INFO", logger="prefixtune"):
        train(options.from_flat(TrainConfig, flat))
    assert "--lr not given: 0.01, the default for a memory prefix" in caplog.text
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["lr"] == 1e-2
    train(options.from_flat(TrainConfig, {**flat, "max_steps": 3, "resume": True}))  # no --lr: the same run
