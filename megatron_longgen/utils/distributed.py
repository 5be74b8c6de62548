"""Process-group set-up shared by the trainer, tools and tests.

`init_distributed()` starts torch.distributed from torchrun's environment, from Slurm's (`srun`, one task per
GPU), or as a single process when there is none, NCCL on GPU and gloo on CPU. In a process without CUDA it
also applies Megatron-Core's CPU patches (`patches/cpu.py`: narrow, version-checked, inert on GPUs), which is
how the trainer, the tools and the test workers get them. `initialize_model_parallel(cfg)` builds
Megatron-Core's TP/PP/CP/DP groups after validating the degrees against the world size.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_longgen.config import LongGenConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(*, timeout_s: float = 1800.0, megatron_cpu_patches: bool = True) -> tuple[int, int]:
    """Initialise the default process group if needed; returns (rank, world_size).

    Without CUDA and with `megatron_cpu_patches` (the default), first applies Megatron-Core's CPU patches
    for the rest of the process (`patches.cpu.apply_cpu_patches`; `remove_cpu_patches()` undoes them).
    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; `srun` sets SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
    (MASTER_ADDR/PORT come from slurm/train.sbatch). Without either, a one-rank group is created on a free
    local port, without touching os.environ: child processes started later must not inherit an address
    that this process already listens on.
    """
    if megatron_cpu_patches and not torch.cuda.is_available():
        from megatron_longgen.patches.cpu import apply_cpu_patches

        apply_cpu_patches()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
        init_method = "env://"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        rank, world, local = (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", "0")),
        )
        init_method = f"tcp://{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
    else:
        rank, world, local = 0, 1, 0
        init_method = f"tcp://127.0.0.1:{free_port()}"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout
    )
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
