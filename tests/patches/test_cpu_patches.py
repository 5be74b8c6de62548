"""The CPU patches of Megatron-Core (megatron_longgen/patches/cpu.py), one process, no process group.

For each kind of patch: what fails without it (upstream unpatched), what it changes (checked against an
oracle written here), and that it leaves torch alone and is fully undone; plus the version gate, the
missing-target rollback and inertness where CUDA is available.
"""

import math

import pytest
import torch

import megatron_longgen.patches._base as base
from megatron_longgen.patches import cpu as cpu_mod
from megatron_longgen.patches.cpu import (
    TESTED_MCORE,
    apply_cpu_patches,
    cpu_patches,
    cpu_patches_active,
    cpu_patches_suspended,
    remove_cpu_patches,
)

if torch.cuda.is_available():
    pytest.skip("the CPU patches are inert where CUDA is available", allow_module_level=True)

# A CPU build of torch raises AssertionError, a CUDA build on a machine without a driver RuntimeError.
NO_CUDA_ERRORS = (AssertionError, RuntimeError)
NO_CUDA = "Torch not compiled with CUDA enabled|no NVIDIA driver"


@pytest.fixture(autouse=True)
def unpatched():
    """Each test starts from upstream as installed, even if an entry point patched this process."""
    with cpu_patches_suspended():
        assert not cpu_patches_active()
        yield


def test_torch_itself_is_untouched_while_active():
    with cpu_patches() as active:
        assert active
        with pytest.raises(NO_CUDA_ERRORS, match=NO_CUDA):
            torch.cuda.current_device()
        assert torch.ones(2).type() == "torch.FloatTensor"
        assert torch._C._len_torch_function_stack() == 0  # no mode left on for ordinary ops
        with pytest.raises(NO_CUDA_ERRORS):
            torch.zeros(1, device="cuda")


def test_every_target_is_patched_then_restored():
    from megatron.core.optimizer import clip_grads, optimizer

    modules = [base.resolve(f"{name}:torch")[0] for name in cpu_mod._TORCH_VIEW_MODULES]
    functions = {path: getattr(*base.resolve(path)) for path in cpu_mod._TENSOR_METHOD_FUNCTIONS}
    imported_copy = optimizer.clip_grad_by_total_norm_fp32  # `from .clip_grads import ...`
    assert imported_copy is clip_grads.clip_grad_by_total_norm_fp32
    with cpu_patches():
        assert all(m.torch is not torch for m in modules)
        for path, original in functions.items():
            patched = getattr(*base.resolve(path))
            assert patched is not original and base.unwrap(patched) is original, path
        assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
        assert base.unwrap(optimizer.clip_grad_by_total_norm_fp32) is imported_copy
    assert all(m.torch is torch for m in modules)
    assert all(getattr(*base.resolve(path)) is original for path, original in functions.items())
    assert optimizer.clip_grad_by_total_norm_fp32 is imported_copy


def test_rotary_embedding_needs_the_view_and_matches_the_formula():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    dim, base_freq, seq = 8, 10000, 5
    rope = RotaryEmbedding(
        kv_channels=dim, rotary_percent=1.0, rotary_base=base_freq, use_cpu_initialization=True
    )
    with pytest.raises(NO_CUDA_ERRORS, match=NO_CUDA):  # inv_freq.to(torch.cuda.current_device())
        rope.get_emb(seq)
    with cpu_patches():
        emb = rope.get_emb(seq)
    inv_freq = [base_freq ** (-2 * i / dim) for i in range(dim // 2)]
    expected = torch.tensor([[p * f for f in inv_freq] * 2 for p in range(seq)])
    assert emb.shape == (seq, 1, 1, dim) and emb.device.type == "cpu"
    torch.testing.assert_close(emb[:, 0, 0], expected)


def _seed_tracker(seed: int):
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.model_parallel_cuda_manual_seed(seed, tp_rank=1, ep_rank=0, etp_rank=0, force_reset_rng=True)
    return mpu_random.get_cuda_rng_tracker()


def test_rng_tracker_runs_on_the_cpu_generator():
    with pytest.raises(NO_CUDA_ERRORS, match=NO_CUDA):  # CudaRNGStatesTracker.add reads the CUDA RNG
        _seed_tracker(5)
    with cpu_patches():
        torch.manual_seed(123)
        tracker = _seed_tracker(5)
        before = torch.randn(3)
        with tracker.fork():  # the model-parallel stream: seed + 2718 + tp_rank (Megatron's rule)
            forked = torch.randn(4)
        after = torch.randn(3)
        with tracker.fork():  # the stream continues where it stopped
            forked_again = torch.randn(4)
        with pytest.raises(Exception, match="already exists"):  # upstream's own bookkeeping still runs
            tracker.add("another-name", 5 + 2718 + 1)
    stream = torch.Generator().manual_seed(5 + 2718 + 1)
    torch.testing.assert_close(forked, torch.randn(4, generator=stream), rtol=0, atol=0)
    torch.testing.assert_close(forked_again, torch.randn(4, generator=stream), rtol=0, atol=0)
    # Outside fork the default stream is seeded by model_parallel_cuda_manual_seed (data-parallel seed
    # = seed) and is not advanced by what ran inside fork.
    default = torch.Generator().manual_seed(5)
    torch.testing.assert_close(before, torch.randn(3, generator=default), rtol=0, atol=0)
    torch.testing.assert_close(after, torch.randn(3, generator=default), rtol=0, atol=0)


def test_grad_clipping_needs_the_type_check_patch_and_scales_like_the_formula():
    from megatron.core.optimizer import clip_grads  # looked up at call time, like Megatron's own callers

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    params[0].grad = torch.tensor([3.0, 0.0, 4.0])
    params[1].grad = torch.tensor([0.0, 12.0])
    total_norm = math.sqrt(9 + 16 + 144)  # 13
    with pytest.raises(AssertionError):  # assert param.grad.type() == 'torch.cuda.FloatTensor'
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total_norm)
    with cpu_patches():
        clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total_norm)
        assert params[0].grad.type() == "torch.FloatTensor"  # the spoof ended with the call
    coeff = 1.0 / (total_norm + 1e-6)
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 0.0, 4.0]) * coeff)
    torch.testing.assert_close(params[1].grad, torch.tensor([0.0, 12.0]) * coeff)


def test_schedule_and_checkpoint_modules_see_cuda_as_the_cpu():
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async
    from megatron.core.pipeline_parallel import schedules

    with pytest.raises(NO_CUDA_ERRORS):
        schedules.torch.zeros([], dtype=torch.int, device="cuda")
    with cpu_patches():
        counter = schedules.torch.zeros([], dtype=torch.int, device="cuda")
        pinned = schedules.torch.tensor([1, 2], device="cpu", pin_memory=True)
        fs_async.torch.cuda.synchronize()
        assert schedules.torch.cuda.current_device() == "cpu"
        assert schedules.torch.Tensor is torch.Tensor  # everything else is torch's own
    assert counter.device.type == "cpu" and counter.dtype == torch.int32
    assert not pinned.is_pinned() and pinned.tolist() == [1, 2]


def test_untested_megatron_version_fails_loudly_and_applies_nothing(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    monkeypatch.setattr(base, "installed_version", lambda package: "0.18.0")
    with pytest.raises(base.UntestedVersionError) as err, cpu_patches():
        pass
    message = str(err.value)
    assert "0.18.0" in message and all(v in message for v in TESTED_MCORE)
    assert not cpu_patches_active() and schedules.torch is torch


def test_missing_target_rolls_back_everything(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    targets = dict(cpu_mod._TENSOR_METHOD_FUNCTIONS)
    targets["megatron.core.optimizer.clip_grads:no_such_function"] = "renamed upstream"
    monkeypatch.setattr(cpu_mod, "_TENSOR_METHOD_FUNCTIONS", targets)
    with pytest.raises(base.PatchTargetError, match="no_such_function"), cpu_patches():
        pass
    assert not cpu_patches_active() and schedules.torch is torch


def test_inert_where_cuda_is_available(monkeypatch):
    from megatron.core.pipeline_parallel import schedules

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_cpu_patches() is False
    with cpu_patches() as active:
        assert active is False and schedules.torch is torch
    assert not cpu_patches_active()


def test_process_wide_entry_point_is_idempotent_and_nests_with_blocks():
    assert apply_cpu_patches() and apply_cpu_patches()
    with cpu_patches():
        pass
    assert cpu_patches_active()  # the block's exit did not undo the entry point's patches
    remove_cpu_patches()
    assert not cpu_patches_active()
    with cpu_patches():
        apply_cpu_patches()
    assert cpu_patches_active()
    remove_cpu_patches()
    assert not cpu_patches_active()


def test_suspension_hides_an_entry_points_patches_and_restores_them():
    assert apply_cpu_patches()
    with cpu_patches_suspended():
        assert not cpu_patches_active()
        with cpu_patches():
            assert cpu_patches_active()
        assert not cpu_patches_active()  # the block's own patches are gone on exit
    assert cpu_patches_active()  # the entry point's are back
    remove_cpu_patches()
    assert not cpu_patches_active()
