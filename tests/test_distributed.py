"""Training on several processes: 2 CPU processes on gloo, started by the real
launchers (``accelerate launch`` with the shipped DDP and DeepSpeed ZeRO-3 configs, and
``torchrun``), train the same prefix as one process; only one of them writes; a killed run
resumes with 2 or 1 processes. Plus the sharding plan, the DeepSpeed config checks, and the
facts that make a DDP wrapper unnecessary."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_encoder, tiny_model

from prefixtune import distributed, options
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.model import PrefixModel
from prefixtune.train import train

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--prefix-length", "3", "--reparam-hidden-size", "16", "--batch-size", "5", "--micro-batch-size", "2",
          "--lr", "1e-2", "--max-length", "64"]  # no --device: the launchers run as users type them


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs use one thread, as each launched process does (OMP_NUM_THREADS=1):
    on a small shared machine, two threads per tiny matmul spend their time waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(model_dir, data_files, out, *extra):
    return ["train", "--model", model_dir, "--data", str(data_files / "train.jsonl"), *COMMON, "--output-dir", str(out),
            *extra]


def _cfg(model_dir, data_files, out, **kw):
    base = dict(model=model_dir, data=str(data_files / "train.jsonl"), output_dir=str(out), prefix_length=3,
                reparam_hidden_size=16, batch_size=5, micro_batch_size=2, lr=1e-2, max_length=64)
    return options.from_flat(TrainConfig, {**base, **kw})


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(name: str) -> list[str]:
    """The command that starts 2 processes of ``python -m prefixtune.cli``, as a user would:
    ``accelerate`` (ddp.yaml), ``deepspeed`` (deepspeed-zero3.yaml) or ``torchrun``."""
    config = {"accelerate": "ddp.yaml", "deepspeed": "deepspeed-zero3.yaml"}.get(name)
    if config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate" / config), "--num_processes", "2", "--main_process_port", str(_port()),
                "-m", "prefixtune.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
            "-m", "prefixtune.cli"]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _launch(name: str, args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(_launcher(name) + args, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _prefix(out):
    return load_file(str(Path(out) / "prefix.safetensors"))["key_values"]


def _steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_plan_gives_each_row_to_one_process_in_the_same_number_of_micro_batches():
    rows = list(range(7))
    for world in (1, 2, 3, 8):
        for micro in (None, 1, 2, 5):
            plans = [distributed.plan(rows, micro, rank, world) for rank in range(world)]
            assert len({len(p) for p in plans}) == 1, "every process must run the same number of passes"
            real = [r for p in plans for part, weight in p if weight for r in part]
            assert real == rows, (world, micro)
            assert all(part and (micro is None or len(part) <= micro) for p in plans for part, _ in p)
    assert distributed.plan(rows[:1], None, 1, 2) == [([0], 0.0)], "a process without rows runs a zero-weight pass"
    assert distributed.plan(rows, 2) == [([0, 1], 1.0), ([2, 3], 1.0), ([4, 5], 1.0), ([6], 1.0)]


def test_a_process_started_alone_stays_local_without_accelerate(monkeypatch):
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(distributed.setup("auto"), distributed.Local)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched()


def test_only_the_prefix_needs_gradients_and_every_prefix_parameter_gets_one():
    """What a DDP wrapper would need checked: it would bucket no frozen weight (none requires a
    gradient), and find_unused_parameters is not needed (every prefix parameter is used)."""
    for reparameterize in (True, False):
        pm = PrefixModel.wrap(tiny_model("llama"), PrefixConfig(prefix_length=3, reparameterize=reparameterize,
                                                                reparam_hidden_size=8))
        trainable = {id(p) for p in pm.trainable_parameters()}
        assert {id(p) for p in pm.parameters() if p.requires_grad} == trainable
        ids = torch.randint(3, 90, (2, 6))
        pm.train()
        pm(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.trainable_parameters())
        assert all(p.grad is None for p in pm.model.parameters())


def test_a_process_that_is_not_the_main_one_writes_nothing(model_dir, data_files, tmp_path, monkeypatch):
    class Second(distributed.Local):  # rank 1 of a run whose communication is the identity
        rank, is_main = 1, False

    monkeypatch.setattr(distributed, "setup", lambda device: Second())
    train(_cfg(model_dir, data_files, tmp_path / "run", max_steps=3, save_every=1))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_processes_train_the_prefix_of_one_and_only_one_writes(model_dir, data_files, tmp_path):
    """``accelerate launch`` with configs/accelerate/ddp.yaml, 2 CPU processes on gloo; a global
    batch of 5 split 3 + 2 rows, in micro-batches of 2."""
    extra = ["--max-steps", "6", "--save-every", "2", "--eval-data", str(data_files / "eval.jsonl"),
             "--eval-every", "3", "--metrics", "bleu", "--max-new-tokens", "4"]
    _launch("accelerate", _args(model_dir, data_files, tmp_path / "two", *extra))
    train(_cfg(model_dir, data_files, tmp_path / "one", max_steps=6, save_every=2,
               eval_data=str(data_files / "eval.jsonl"), eval_every=3, metrics="bleu", max_new_tokens=4))
    two, one = tmp_path / "two", tmp_path / "one"
    difference = (_prefix(two) - _prefix(one)).abs().max().item()
    assert difference < 1e-5, f"2 processes ended {difference} away from 1"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6, 6], "each step logged once: one writer"
    ones = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, ones):
        if "loss" in a:  # the loss and token rate are those of the whole global batch
            assert abs(a["loss"] - b["loss"]) < 1e-4
    assert json.loads((two / "checkpoint" / "trainer_state.json").read_text())["processes"] == 2
    assert not list(two.glob(".*")), "no staging folder left behind"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launchers_as_users_type_them_train_the_prefix_of_one_process(launcher, model_dir, data_files, tmp_path):
    """``torchrun --nproc-per-node 2 -m prefixtune.cli train ...`` and ``accelerate launch`` with the
    shipped ddp.yaml, without --device, on a machine without a GPU: both processes join one group."""
    done = _launch(launcher, _args(model_dir, data_files, tmp_path / "two", "--max-steps", "3"))
    assert "process 1 of 2" in done.stdout + done.stderr
    train(_cfg(model_dir, data_files, tmp_path / "one", max_steps=3))
    difference = (_prefix(tmp_path / "two") - _prefix(tmp_path / "one")).abs().max().item()
    assert difference < 1e-5, f"2 processes ended {difference} away from 1"


@pytest.mark.slow
def test_a_process_launched_as_one_of_two_that_finds_itself_alone_stops_before_writing(model_dir, data_files,
                                                                                        tmp_path):
    """``--device cuda`` on a machine without one: Accelerate leaves each process outside the group.
    Each stops with one line instead of training the whole batch and racing the other to the files."""
    out = tmp_path / "two"
    done = subprocess.run(_launcher("torchrun") + _args(model_dir, data_files, out, "--max-steps", "3",
                                                         "--device", "cuda"),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "started as one of 2 (WORLD_SIZE) but joined a group of 1" in done.stderr, done.stderr[-2000:]
    assert "/prefixtune/" not in done.stderr, "a one-line error, no traceback through prefixtune's code"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="FSDP2 ignored parameters need torch 2.7")
@pytest.mark.slow
def test_fsdp_shards_the_base_and_trains_the_prefix_of_one_process(model_dir, data_files, tmp_path):
    """2 CPU processes through Accelerate's FSDP2 path (tests/fsdp_on_cpu.py says how), with
    evaluation and generation on the sharded model; shares of 3 and 2 rows in micro-batches of 2,
    so the second process runs a zero-weight padding pass to keep FSDP's collectives in step."""
    extra = ["--max-steps", "4", "--save-every", "2", "--eval-data", str(data_files / "eval.jsonl"),
             "--eval-every", "2", "--metrics", "bleu", "--max-new-tokens", "4"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
               str(ROOT / "tests" / "fsdp_on_cpu.py"), *_args(model_dir, data_files, tmp_path / "fsdp", *extra)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train(_cfg(model_dir, data_files, tmp_path / "one", max_steps=4, save_every=2,
               eval_data=str(data_files / "eval.jsonl"), eval_every=2, metrics="bleu", max_new_tokens=4))
    difference = (_prefix(tmp_path / "fsdp") - _prefix(tmp_path / "one")).abs().max().item()
    assert difference < 1e-5, f"FSDP on 2 processes ended {difference} away from 1 process"
    scores = [json.loads((tmp_path / run / "eval.json").read_text())["with prefix"] for run in ("fsdp", "one")]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], abs=1e-5)
    assert scores[0]["bleu"] == scores[1]["bleu"]


ACCELERATE_ZERO3 = {  # what Accelerate's plugin makes of deepspeed-zero3.yaml, plus "auto" tuning values
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none", "nvme_path": None},
                          "offload_param": {"device": "none", "nvme_path": None},
                          "stage3_prefetch_bucket_size": "auto", "stage3_max_live_parameters": 10**9},
    "gradient_clipping": "auto", "steps_per_print": float("inf"), "fp16": {"enabled": False},
    "bf16": {"enabled": False},
}


def test_zero3_config_keeps_the_partitioning_and_nothing_of_an_optimizer(caplog):
    zero = {"stage": 3, "offload_param": {"device": "none", "nvme_path": None}, "stage3_max_live_parameters": 10**9}
    assert distributed.zero3_config(ACCELERATE_ZERO3) == {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero}
    with caplog.at_level(logging.WARNING, logger="prefixtune"):
        distributed.zero3_config({**ACCELERATE_ZERO3, "optimizer": {"type": "AdamW"}})
    assert "ignoring the DeepSpeed config's optimizer" in caplog.text


@pytest.mark.parametrize("change, message", [
    ({"zero_optimization": {"stage": 2}}, "ZeRO stage 2: prefixtune supports stage 3"),
    ({"bf16": {"enabled": True}}, "enables bf16"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, "offloads parameters"),
])
def test_zero3_config_refuses_in_one_line_what_prefixtune_does_not_do(change, message):
    with pytest.raises(ValueError, match=message) as error:
        distributed.zero3_config({**ACCELERATE_ZERO3, **change})
    assert "\n" not in str(error.value)


def test_zero3_refuses_a_task_head_that_would_be_partitioned_with_the_base():
    """A classifier's head trains with the prefix, but it lives in the base that ZeRO-3 partitions."""
    pytest.importorskip("deepspeed")
    pm = PrefixModel.wrap(tiny_encoder("bert"), PrefixConfig(prefix_length=3))
    with pytest.raises(ValueError, match="a task head or LoRA weights would be partitioned"):
        distributed.partition(pm, distributed.zero3_config(ACCELERATE_ZERO3))


def _partitioned(log: str) -> list[tuple[int, int]]:
    """(held, whole) from each process's "ZeRO-3 partitioned the frozen base" line."""
    found = re.findall(r"this process holds (\d+) of its (\d+) weights", log)
    return [(int(held), int(whole)) for held, whole in found]


@pytest.mark.slow
def test_deepspeed_zero3_partitions_the_base_and_trains_the_prefix_of_one_process(model_dir, data_files, tmp_path):
    """``accelerate launch`` with configs/accelerate/deepspeed-zero3.yaml, 2 CPU processes (DeepSpeed's
    CPU accelerator, gloo), with evaluation, generation and gradient checkpointing through the
    partitioned base; shares of 3 and 2 rows in micro-batches of 2, so the second process runs a
    zero-weight padding pass to keep ZeRO-3's gathers in step."""
    pytest.importorskip("deepspeed")
    extra = ["--max-steps", "4", "--save-every", "2", "--eval-data", str(data_files / "eval.jsonl"),
             "--eval-every", "2", "--metrics", "bleu", "--max-new-tokens", "4", "--gradient-checkpointing"]
    done = _launch("deepspeed", _args(model_dir, data_files, tmp_path / "zero3", *extra))
    held = _partitioned(done.stdout + done.stderr)
    assert len(held) == 2 and all(0 < part <= whole // 2 + 64 for part, whole in held), held  # half, padded
    train(_cfg(model_dir, data_files, tmp_path / "one", max_steps=4, save_every=2, gradient_checkpointing=True,
               eval_data=str(data_files / "eval.jsonl"), eval_every=2, metrics="bleu", max_new_tokens=4))
    zero3, one = tmp_path / "zero3", tmp_path / "one"
    difference = (_prefix(zero3) - _prefix(one)).abs().max().item()
    assert difference < 1e-5, f"ZeRO-3 on 2 processes ended {difference} away from 1 process"
    scores = [json.loads((run / "eval.json").read_text())["with prefix"] for run in (zero3, one)]
    assert scores[0]["loss"] == pytest.approx(scores[1]["loss"], abs=1e-5)
    assert scores[0]["bleu"] == scores[1]["bleu"]
    for folder in (".", "checkpoint"):
        assert sorted(p.name for p in (zero3 / folder).iterdir()) == sorted(p.name for p in (one / folder).iterdir())
    rows = [json.loads(line) for line in (zero3 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4], "each step logged once: one writer"


@pytest.mark.slow
def test_deepspeed_zero3_runs_the_partitioned_base_whole_for_init_text(model_dir, data_files, tmp_path):
    """``--init-text`` runs the base before DeepSpeed's hooks exist, on a base that transformers
    loaded partitioned: it is gathered for that forward. After two steps the prefix equals one
    process's (the fit to the words leaves no gradient behind, so the all-reduce of the first step adds
    nothing of it)."""
    pytest.importorskip("deepspeed")
    _launch("deepspeed", _args(model_dir, data_files, tmp_path / "zero3", "--max-steps", "2", "--init-text", "red",
                               "--lr", "1e-2"))
    train(_cfg(model_dir, data_files, tmp_path / "one", max_steps=2, init_text="red", lr=1e-2))
    difference = (_prefix(tmp_path / "zero3") - _prefix(tmp_path / "one")).abs().max().item()
    assert difference < 1e-5, f"the text-initialized prefix under ZeRO-3 is {difference} away from 1 process's"


def _kill_with_workers(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and its workers at once. Killing the launcher's process group is not
    enough: torchrun starts each worker in a session of its own, and they would train on."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for member in family:
        member.kill()
    psutil.wait_procs(family)
    proc.wait()


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_with_two_or_one_processes(model_dir, data_files, tmp_path):
    extra = ["--max-steps", "60", "--save-every", "5"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_launcher("torchrun") + _args(model_dir, data_files, killed, *extra), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (state.is_file() and json.loads(state.read_text())["state"]["step"] >= 10):
        time.sleep(0.05)
    _kill_with_workers(proc)
    stopped_at = json.loads(state.read_text())["state"]["step"]
    assert 10 <= stopped_at < 60, "the run should have been killed midway"
    time.sleep(1.5)  # a checkpoint every 5 steps of a fraction of a second each: a survivor would write one
    assert json.loads(state.read_text())["state"]["step"] == stopped_at, "a worker outlived the kill"
    subprocess.run(["cp", "-r", str(killed), str(tmp_path / "killed1")], check=True)
    _launch("torchrun", _args(model_dir, data_files, killed, *extra, "--resume"))
    train(_cfg(model_dir, data_files, tmp_path / "killed1", max_steps=60, save_every=5, resume=True))
    train(_cfg(model_dir, data_files, tmp_path / "straight", max_steps=60, save_every=5))
    for out in (killed, tmp_path / "killed1"):
        assert _steps(out) == list(range(1, 61)), out
        difference = (_prefix(out) - _prefix(tmp_path / "straight")).abs().max().item()
        assert difference < 1e-5, f"{out.name} ended {difference} away from the uninterrupted run"
