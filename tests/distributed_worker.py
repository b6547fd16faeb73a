"""One process of a data-parallel test run (tests/test_distributed.py starts it with torch.multiprocessing)."""

import os
import sys
from pathlib import Path


class InterruptAt:
    """An on_event that asks the host to stop after `step` (the way the tab's Interrupt does)."""

    def __init__(self, host, step: int | None):
        self.host, self.step = host, step

    def __call__(self, event) -> None:
        if event.kind == "step" and event.step == self.step:
            self.host.interrupt()


def run(rank: int, world_size: int, port: int, checkpoint: str, out_dir: str, config_values: dict, run_dir: str | None, stop_at: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    from lib_lora.hosts.standalone import StandaloneHost
    from lib_lora.train.config import TrainConfig
    from lib_lora.train.distributed import from_environment
    from lib_lora.train.trainer import train

    torch.set_num_threads(1)
    distributed = from_environment()
    host = StandaloneHost.from_file(Path(checkpoint), out_dir=Path(out_dir), device="cpu")
    try:
        train(TrainConfig(**config_values), host, on_event=InterruptAt(host, stop_at), run_dir=Path(run_dir) if run_dir else None,
              resume=run_dir is not None, distributed=distributed)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without the interpreter's teardown: after a finished run, torch's C++ destructors at exit sometimes
    # aborted this process ("terminate called without an active exception", no Python frame left: faulthandler),
    # about one run in eight when other tests had trained in the parent first. The run's files are all written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
