"""Run ``cli.py`` under FSDP on CPU processes (gloo): a test harness, not a supported mode.

accelerate switches to FSDP only for GPU-type process groups, while torch's FSDP itself runs on
CPU with gloo when given ``device_id=cpu`` (which is what accelerate passes). Started by
``torch.distributed.run``, this script sets the FSDP_* environment that
``accelerate launch --config_file docs/accelerate/fsdp.yaml`` sets (read from that very file), turns
accelerate's MULTI_CPU state into FSDP with the plugin built from that environment, and runs the
CLI. The trainer's FSDP path (sharded parameters, full state dict on save, the sharded
``wt_dist_reg`` distance) then executes on CPU.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_cpu_launcher.py unlearn ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def fsdp_environment(config_file: Path) -> dict[str, str]:
    """The FSDP_* variables accelerate launch derives from a config file's ``fsdp_config``."""
    config = yaml.safe_load(config_file.read_text())
    env = {"ACCELERATE_USE_FSDP": "true"}
    for key, value in config["fsdp_config"].items():
        env["FSDP_" + key.removeprefix("fsdp_").upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def force_fsdp_on_cpu() -> None:
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = Accelerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.distributed_type == DistributedType.MULTI_CPU:
            self.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what AcceleratorState does
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    Accelerator.__init__ = init


def main() -> None:
    os.environ.update(fsdp_environment(REPO / "docs" / "accelerate" / "fsdp.yaml"))
    force_fsdp_on_cpu()
    sys.path.insert(0, str(REPO))
    from cli import main as cli_main

    cli_main(sys.argv[1:])  # returns on success; exits non-zero on failure
    import torch.distributed

    # a finished run tears its process group down itself: left to interpreter exit, gloo's threads
    # can abort a rank after its work is saved (pytorch/pytorch#179291)
    if torch.distributed.is_initialized():
        sys.exit("process group still alive after a finished run")


if __name__ == "__main__":
    main()
