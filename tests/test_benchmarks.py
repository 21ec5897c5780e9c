"""The benchmarks' shared arithmetic: a paired ratio's bootstrap interval, and ``benchmarks.generate``
printing a saved results file again."""

import json
import random

import pytest

from benchmarks import generate
from benchmarks.common import paired_ratio, ratio_interval


def _rounds(count: int, seed: int) -> dict:
    """Two arms' seconds over ``count`` rounds: ``b`` takes 3 % longer than ``a``, each call off by up to 5 %."""
    noise = random.Random(seed)
    a = [4.0 * noise.uniform(0.95, 1.05) for _ in range(count)]
    return {"a": a, "b": [t * 1.03 * noise.uniform(0.95, 1.05) for t in a]}


def test_the_interval_holds_the_ratio_and_narrows_with_more_rounds():
    few, many = _rounds(9, seed=1), _rounds(81, seed=1)
    for times in (few, many):
        low, high = ratio_interval(times, "b", "a")
        assert low <= paired_ratio(times, "b", "a") <= high
        assert ratio_interval(times, "b", "a") == [low, high]  # the same times, the same interval
    width = [high - low for low, high in (ratio_interval(few, "b", "a"), ratio_interval(many, "b", "a"))]
    assert width[1] < width[0] / 2
    exact = {"a": [2.0, 3.0, 5.0], "b": [3.0, 4.5, 7.5]}
    assert ratio_interval(exact, "b", "a") == [1.5, 1.5]
    assert ratio_interval(exact, "b", "missing") is None


def test_a_saved_generate_run_prints_its_tables_again_with_intervals(tmp_path, capsys):
    times = {"plain": _rounds(15, seed=2)["a"], "memory": _rounds(15, seed=2)["b"]}
    summary = generate.summarize(times, {}, {}, 512, ["plain", "memory"])
    run = {"command": "python -m benchmarks.generate --batch-sizes 8", "code_version": "abc1234",
           "args": {"prompt_len": 32, "new_tokens": 64}, "batch_size": {"8": summary}}
    path = tmp_path / "generate.json"
    path.write_text(json.dumps({"benchmark": "generate", "runs": [run]}))
    generate.main(["--summarize", str(path)])
    memory_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("memory"))
    low, high = summary["arms"]["memory"]["vs_plain_95"]
    assert f"{summary['arms']['memory']['vs_plain']:.2f}x" in memory_row and f"{low:.3f}-{high:.3f}" in memory_row
    path.write_text("{}")
    with pytest.raises(SystemExit, match="not a results file"):
        generate.main(["--summarize", str(path)])


def test_one_model_arms_share_the_instance_and_plain_runs_the_models_own_kernel():
    """``--one-model``: plain, prefixtune and memory on one instance; plain's output is the untouched
    model's, and each prefix changes it."""
    import copy

    import torch
    from tiny import tiny_model

    model = tiny_model("llama")
    untouched = copy.deepcopy(model).eval()
    arms = generate.one_model_arms(model, seed=0)
    ids = torch.randint(0, untouched.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        outputs = {name: run(ids, torch.ones_like(ids), kw) for name, (run, _) in arms.items()}
        expected = untouched.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert {module for _, module in arms.values()} == {arms["plain"][1]}  # one PrefixModel, one model under it
    assert torch.equal(outputs["plain"], expected)
    assert model.config._attn_implementation == "prefixtune_sdpa"  # the last arm run was a prefixed one
    assert not torch.equal(outputs["prefixtune"], expected) and not torch.equal(outputs["memory"], expected)
