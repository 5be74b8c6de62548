"""utils/distributed.py: init_distributed is the CPU entry point of Megatron-Core's CPU patches."""

import pytest
import torch
import torch.distributed as dist

from megatron_longgen.patches.cpu import cpu_patches_active, cpu_patches_suspended
from megatron_longgen.utils.distributed import destroy, init_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches are inert with CUDA")


def test_init_distributed_applies_the_cpu_patches_unless_told_not_to():
    created = not dist.is_initialized()
    try:
        with cpu_patches_suspended():
            assert init_distributed(megatron_cpu_patches=False) == (0, 1)
            assert not cpu_patches_active()
            init_distributed()
            assert cpu_patches_active()
    finally:
        if created:
            destroy()
