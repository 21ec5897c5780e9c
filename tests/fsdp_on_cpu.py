"""``python -m prefixtune.cli`` with Accelerate's FSDP path on CPU processes (gloo).

Accelerate offers FSDP on GPUs only (its launcher and state turn ``--cpu`` runs into plain
multi-CPU ones), but ``torch.distributed.fsdp.fully_shard`` itself runs on CPUs. So, for the
tests, after prefixtune makes its Accelerator the shared state is switched to FSDP2, as
``accelerate launch --config_file configs/accelerate/fsdp.yaml`` would set it on GPUs; from
there on the run takes the same path (``Accelerator.prepare`` shards the frozen base, the
prefix in ``ignored_modules``). Start it under ``torchrun`` like the CLI module.
"""

import sys

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from prefixtune import distributed
from prefixtune.cli import main

real_init = distributed.Processes.__init__


def as_fsdp(self, device):
    real_init(self, device)
    state = self.accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                       reshard_after_forward=True)
    state.distributed_type = DistributedType.FSDP
    self.kind = "fsdp"


if __name__ == "__main__":
    distributed.Processes.__init__ = as_fsdp
    sys.exit(main(sys.argv[1:]))
