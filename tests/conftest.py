"""Shared pytest set-up: CPU compatibility for in-process Megatron tests, GPU markers."""

import contextlib
import os
import sys

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    multi = has_gpu and torch.cuda.device_count() >= 2
    for item in items:
        # Markers, not keywords: keywords also hold package names (tests/multi_gpu/ is not a marker).
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("multi_gpu") and not multi:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """A test that runs W&B in-process leaves `WANDB_SERVICE` in os.environ (W&B's way of letting child
    processes share its service); every later subprocess (trainers, Slurm jobs) would then attach to that
    service, which still holds the runs it saw. Tear it down after each test."""
    yield
    if "WANDB_SERVICE" in os.environ:
        wandb = sys.modules.get("wandb")
        if wandb is not None:
            with contextlib.suppress(Exception):  # best effort: dropping the variable below is what matters
                wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
