"""Process-group set-up shared by the trainer, tools and tests.

`init_distributed()` starts torch.distributed from torchrun's environment, from Slurm's (`srun`, one task per
GPU), or as a single process when there is none, NCCL on GPU and gloo on CPU; `initialize_model_parallel(cfg)` builds Megatron-Core's
TP/PP/CP/DP groups after validating the degrees against the world size.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_longgen.config import LongGenConfig
from megatron_longgen.utils.cpu_compat import enable_cpu_compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(*, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialise the default process group if needed; returns (rank, world_size)."""
    if not torch.cuda.is_available():
        enable_cpu_compat()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        # Launched by `srun` with one task per GPU (slurm/train.sbatch): take the ranks from Slurm.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def initialize_model_parallel(cfg: LongGenConfig) -> None:
    """Megatron-Core parallel state for cfg.parallel (destroys any previous one)."""
    from megatron.core import parallel_state

    world = dist.get_world_size()
    cfg.parallel.data_parallel(world)  # raises a ValueError naming the numbers
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_parallel,
        pipeline_model_parallel_size=p.pipeline_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_parallel,
        context_parallel_size=p.context_parallel,
    )


def set_seed(seed: int) -> None:
    """Seed Python, numpy, torch and Megatron's model-parallel RNG tracker (TP ranks get distinct
    dropout streams, identical weights: Megatron's convention)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
