"""Training on several processes (GPUs, nodes) through Hugging Face Accelerate.

``prefixtune train`` started by ``accelerate launch`` or ``torchrun`` finds itself in a
distributed environment (``WORLD_SIZE`` > 1, or an Accelerate FSDP or DeepSpeed config) and
trains data-parallel; started by itself it gets :class:`Local`, which does nothing at all, so a
single process runs exactly as it always did, without Accelerate.

How the work is split, and why:

* Every process holds the same prefix and takes its contiguous share of each *global* batch
  (``batch_size`` rows, whatever the number of processes), in micro-batches of
  ``micro_batch_size`` rows. Under FSDP and ZeRO-3 every process runs the same number of
  micro-batches (a process short of rows runs a zero-weighted one), since a forward is a
  collective there.
* The loss of a micro-batch is its summed token loss over the label-token count of the whole
  global batch, all-reduced across processes first; the prefix gradients are then *summed*
  across processes. The result is the single-process gradient of the same global batch, so
  the trained prefix does not depend on the number of processes.
* The prefix gradients are all-reduced here, in one flat buffer per optimizer step (the
  step's loss and token count ride along), rather than by wrapping the model in DDP. The
  prefix is a few MB, so this is the least communication possible; DDP would add nothing but
  cost: its constructor broadcasts every parameter and buffer of the module, the frozen base
  included (gigabytes for a 7B model), it re-broadcasts buffers at every forward, and it needs
  ``no_sync`` bookkeeping around micro-batches. (DDP would not bucket the frozen weights,
  which have ``requires_grad=False``, and would not need ``find_unused_parameters``, since
  every prefix parameter is used in every forward; ``tests/test_distributed.py`` checks both
  facts, so switching to DDP later stays an option.)
* Under FSDP the frozen base is sharded by Accelerate, and the prefix is listed in FSDP's
  ``ignored_modules``: it stays a plain, replicated module that the optimizer, the
  checkpoint and the all-reduce above treat exactly as in the DDP case.
* Under DeepSpeed ZeRO-3 the same holds with another mechanism: only the frozen base is handed
  to DeepSpeed (an engine without an optimizer, :func:`partition`), so the prefix is never
  partitioned, and no DeepSpeed checkpoint (pickle) is ever written.
* Evaluation runs in every process on the whole evaluation set (under FSDP and ZeRO-3 each
  forward is a collective anyway) and the main process's result is broadcast, so that every process takes
  the same best-prefix and early-stopping decisions.
* Only the main process writes files; see ``train.py``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
import torch.distributed as torch_dist

log = logging.getLogger("prefixtune")


def launched() -> bool:
    """Whether this process was started by a distributed launcher (torchrun, accelerate launch)."""
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return several or _flag("ACCELERATE_USE_FSDP") or _flag("ACCELERATE_USE_DEEPSPEED")


def _flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set true, as ``accelerate launch`` sets its mode flags."""
    return os.environ.get(name, "").lower() in ("1", "true")


def setup(device: str) -> "Local | Processes":
    """The process group this run belongs to: :class:`Processes` under a launcher, else :class:`Local`.

    Args:
        device: The ``--device`` option; ``cpu`` keeps a launched run on the CPU (gloo).
    """
    return Processes(device) if launched() else LOCAL


def plan(rows: list, micro_batch_size: int | None, rank: int = 0, world_size: int = 1) -> list[tuple[list, float]]:
    """This process's micro-batches of one global batch, each with its loss weight (1, or 0 for padding).

    Process ``rank`` takes the ``rank``-th of ``world_size`` contiguous shares of ``rows``
    (sizes differ by at most one). Every process gets the same number of micro-batches; a
    process whose share is used up repeats the batch's first row with weight 0, so that it still
    takes part in each forward and backward without changing the gradient.
    """
    base, extra = divmod(len(rows), world_size)
    start = rank * base + min(rank, extra)
    share = rows[start:start + base + (rank < extra)]
    widest = base + (extra > 0)  # the largest share; it decides the micro-batch count
    micro = micro_batch_size or widest
    count = max(1, math.ceil(widest / micro))
    return [(share[i * micro:(i + 1) * micro], 1.0) if i * micro < len(share) else (rows[:1], 0.0)
            for i in range(count)]


def _accelerator(device: str):
    """Accelerate's view of this launch: process group, device, and the FSDP or DeepSpeed plugin.

    Under DeepSpeed, ``cpu=True`` is not passed even for ``--device cpu``: Accelerate would quietly
    make plain CPU processes of the launch. DeepSpeed picks the device itself (CPUs where no GPU
    is visible), and there Accelerate must be told the backend, gloo, or it counts one process.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        # `auto` on a machine without CUDA is the CPU: told otherwise, Accelerate would look for GPUs
        # and, finding none, leave every process alone outside the process group
        return Accelerator(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    gloo = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(kwargs_handlers=gloo)


class Local:
    """One process, nothing to communicate: every method is the identity or does nothing."""

    rank, world_size, is_main, kind = 0, 1, True, "local"

    def prepare(self, pm, optimizer):
        """The module to call for forward passes (the prefix model itself)."""
        return pm

    def seed(self, seed: int, step: int) -> None:
        """Nothing to do: one process keeps the RNG stream it was seeded or resumed with."""

    def plan(self, rows: list, micro_batch_size: int | None) -> list[tuple[list, float]]:
        return plan(rows, micro_batch_size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def reduce_gradients(self, params: list, *scalars: torch.Tensor) -> list[torch.Tensor]:
        return list(scalars)

    def broadcast(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def evaluation(self, model):
        return contextlib.nullcontext()

    def whole_base(self, model):
        """Nothing to gather: the base is whole."""
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


LOCAL = Local()
"""The one process of a run started by itself."""


class Processes(Local):
    """Several processes started by ``accelerate launch`` or ``torchrun``, joined through Accelerate.

    Accelerate reads the launcher's environment (and the ``--config_file`` given to
    ``accelerate launch``), initializes the process group (NCCL on GPUs, gloo on CPUs) and
    picks this process's device; FSDP and DeepSpeed ZeRO-3 come from its plugins (``kind`` is
    ``ddp``, ``fsdp`` or ``zero3``).
    """

    def __init__(self, device: str):
        from accelerate.utils import DistributedType

        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"--device {device} cannot be used with several processes (auto, cpu or cuda)")
        self.accelerator = _accelerator(device)
        kind = self.accelerator.distributed_type
        self.kind = {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "zero3"}.get(kind, "ddp")
        if self.kind == "zero3":
            self.zero3_config = zero3_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            if device != "auto" and self.accelerator.device.type != torch.device(device).type:
                raise ValueError(f"--device {device}: DeepSpeed chose {self.accelerator.device} (hide the GPUs with "
                                 "CUDA_VISIBLE_DEVICES= to train on CPUs)")
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        launched_as = int(os.environ.get("WORLD_SIZE", "1"))
        if launched_as > 1 and self.world_size != launched_as:  # alone, it would train and write as if it were all
            raise ValueError(f"this process was started as one of {launched_as} (WORLD_SIZE) but joined a group "
                               f"of {self.world_size}: stopping before it trains or writes anything; check --device "
                               "and the launcher's configuration")
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        log.info("process %d of %d (%s) on %s", self.rank, self.world_size, self.kind, self.device)

    def prepare(self, pm, optimizer):
        """Give every process rank 0's prefix; under FSDP or ZeRO-3 shard the frozen base (the prefix
        stays whole).

        Returns the module to call for forward passes: under ZeRO-3 ``pm`` itself (see
        :func:`partition`). Under FSDP the optimizer (over the prefix only) is handed to Accelerate
        because FSDP2 insists on seeing it, but it is used as it is: the prefix is not sharded, so
        its parameters stay the ones the optimizer holds.
        """
        for tensor in pm.prefixes.state_dict().values():
            torch_dist.broadcast(tensor.data, src=0)  # identical seeds already agree; this makes sure
        if self.kind == "zero3":
            return partition(pm, self.zero3_config)
        if self.kind != "fsdp":
            return pm
        plugin = self.accelerator.state.fsdp_plugin
        if plugin.ignored_modules not in (None, "prefixes"):
            log.warning("replacing the FSDP config's ignored_modules by the prefix: it must not be sharded")
        plugin.ignored_modules = [pm.prefixes]
        if plugin.transformer_cls_names_to_wrap is None:  # PrefixModel itself has no _no_split_modules
            plugin.transformer_cls_names_to_wrap = list(getattr(pm.model, "_no_split_modules", None) or [])
        runner, _ = self.accelerator.prepare(pm, optimizer)
        return runner

    def seed(self, seed: int, step: int) -> None:
        """Give each process its own RNG stream (prefix dropout), a function of (seed, rank, step).

        Identical streams would drop the same positions in every process; and a checkpoint
        holds one RNG state, not one per process, so a resumed run (with any number of
        processes) derives its streams afresh from the step it resumes at. With the default
        ``prefix_dropout`` 0 nothing in a step is random and resumes are exact.
        """
        torch.manual_seed((seed * 1_000_003 + step) * 4_099 + self.rank)

    def plan(self, rows: list, micro_batch_size: int | None) -> list[tuple[list, float]]:
        """Padding passes only under FSDP and ZeRO-3, whose forwards are collectives; elsewhere they
        would be wasted work."""
        passes = plan(rows, micro_batch_size, self.rank, self.world_size)
        return passes if self.kind in ("fsdp", "zero3") else [(part, weight) for part, weight in passes if weight]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over all processes (a new tensor)."""
        tensor = tensor.clone()
        torch_dist.all_reduce(tensor)
        return tensor

    def reduce_gradients(self, params: list, *scalars: torch.Tensor) -> list[torch.Tensor]:
        """Sum the gradients of ``params`` over all processes in place; returns ``scalars`` summed too.

        One flat buffer, one all-reduce. A parameter without a gradient contributes zeros
        (and then holds the sum of the others').
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [s.reshape(1).to(grads[0]) for s in scalars])
        torch_dist.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset:offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()
        return list(flat[offset:])

    def broadcast(self, obj):
        """The main process's ``obj`` (any JSON-like value), in every process."""
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def evaluation(self, model):
        """Make ``PrefixModel.forward``/``generate`` callable directly: under FSDP the root's own
        parameters (embeddings, final norm, head) are gathered for the duration; the wrapped
        transformer layers gather theirs in their own forward, as in training. Under ZeRO-3 nothing is
        needed: DeepSpeed's hooks gather every module's weights for its forward (and transformers'
        ``generate`` keeps the processes in step, ``synced_gpus``)."""
        if self.kind != "fsdp":
            yield
            return
        if hasattr(model, "unshard"):  # FSDP2: the module itself is the root FSDPModule
            model.unshard()
            try:
                yield
            finally:
                model.reshard()
            return
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
            yield

    def whole_base(self, model):
        """The loaded base made whole for a forward outside training (``--init-text``), then given back.

        Only under ZeRO-3 is there anything to do: Accelerate's DeepSpeed config makes transformers
        load the base straight into its partitions (``deepspeed.zero.Init``), and DeepSpeed's hooks
        that gather weights for each module's forward come only with :func:`partition`. Every process
        holds the whole base for the duration.
        """
        if self.kind != "zero3":
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))

    def close(self) -> None:
        """Wait for every process, so that no launcher sees one finish before the files are written."""
        self.barrier()


def zero3_config(config: dict) -> dict:
    """The DeepSpeed config of the engine that partitions the frozen base: the launch config's
    ``zero_optimization`` (stage 3), and nothing of an optimizer.

    prefixtune's own AdamW trains the prefix outside the engine (a few MB, saved as safetensors),
    so the config's optimizer, scheduler, clipping and batch sizes do not apply; values left
    "auto" take DeepSpeed's defaults. Refused: other stages (1 and 2 shard only optimizer state
    and gradients, which are the prefix's few MB: use ddp.yaml), fp16/bf16 (DeepSpeed would cast
    the base; precision is ``--precision``) and parameter offload (not verified).
    """
    zero = {key: value for key, value in config.get("zero_optimization", {}).items() if value != "auto"}
    if zero.get("stage") != 3:
        raise ValueError(f"DeepSpeed ZeRO stage {zero.get('stage')}: prefixtune supports stage 3, which partitions "
                         "the frozen base (use configs/accelerate/deepspeed-zero3.yaml, or ddp.yaml)")
    for key in ("fp16", "bf16"):
        if config.get(key, {}).get("enabled") is True:
            raise ValueError(f"the DeepSpeed config enables {key}: set mixed_precision to 'no' and use --precision")
    if _offload(zero, "offload_param"):
        raise ValueError("the DeepSpeed config offloads parameters (offload_param_device): prefixtune does not "
                         "support it; set it to none")
    ignored = [key for key in ("optimizer", "scheduler") if key in config]
    ignored += ["offload_optimizer"] if _offload(zero, "offload_optimizer") else []
    if ignored:
        log.warning("ignoring the DeepSpeed config's %s: the prefix trains with prefixtune's AdamW, outside "
                    "DeepSpeed", ", ".join(ignored))
    zero.pop("offload_optimizer", None)
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero}


def _offload(zero: dict, key: str) -> bool:
    return (zero.get(key) or {}).get("device", "none") not in ("none", None)


def partition(pm, config: dict):
    """Partition ``pm``'s frozen base over the processes with ZeRO-3; the prefix stays whole.

    Only the base goes to ``deepspeed.initialize``, without an optimizer, so DeepSpeed makes no
    optimizer of its own: it partitions the base's parameters and hooks its modules to gather each
    one's weights for its forward and backward. The prefix is not part of that module, so it is
    neither partitioned nor hooked: prefixtune's optimizer, checkpoint and all-reduce treat it as
    under DDP. Returns ``pm``, which is called as ever (the hooks sit inside it).
    """
    import deepspeed

    if pm.heads or pm.adapter_params:
        raise ValueError("DeepSpeed ZeRO-3 trains a prefix alone: a task head or LoRA weights would be partitioned "
                         "with the base (use configs/accelerate/ddp.yaml)")
    deepspeed.initialize(model=pm.model, config=config)
    held = sum(p.ds_tensor.numel() for p in pm.model.parameters())
    whole = sum(p.ds_numel for p in pm.model.parameters())
    log.info("ZeRO-3 partitioned the frozen base: this process holds %d of its %d weights", held, whole)
    return pm
