"""Megatron-Core in a process without CUDA: which upstream code is patched, per tested version, and the
entry points that apply and undo it.

Megatron-Core assumes a GPU in the places listed in the tables below; each was found by running this
project's CPU suite with a tracer on every tested version, and each fails without its patch (with
`AssertionError: Torch not compiled with CUDA enabled`, or a `TypeError`/`AssertionError` from a check
that parameters are `torch.cuda.*Tensor`). The patches, built from `patches/cpu_torch.py`:

- the `torch` global of each module in `_TORCH_VIEW_MODULES` becomes a CPU view of torch (CUDA device,
  stream and RNG calls answer for the CPU; factory functions put `device="cuda"` on the CPU);
- each function in `_TENSOR_METHOD_FUNCTIONS` is wrapped so that `t.cuda()` / `t.type()` act on the CPU
  while it runs;
- `megatron.core.tensor_parallel.random._lazy_call` runs its callback at once (there is no CUDA
  initialisation to wait for), so the RNG tracker really sets the (CPU) generator state.

With these, Megatron's RNG tracker keeps its semantics on the CPU generator: `fork()` swaps the default
generator's state in and out, `add()` derives a stream per seed, and TP ranks get distinct streams.

Nothing else changes: torch itself is not modified (`torch.cuda.current_device()` still raises, a CPU
tensor's `.type()` is still `torch.FloatTensor`, no mode is left on), so the model's forward, our
kernels and the converter's own code run at full speed and with torch's own warnings.

Entry points (all inert, returning False, where CUDA is available):
- `cpu_patches()`: context manager; applies for the block, undoes on exit (nests).
- `apply_cpu_patches()`: for a CPU process's entry point (`utils.distributed.init_distributed` calls
  it, so the trainer, tools and test workers get it); stays until `remove_cpu_patches()`. Idempotent.
Both raise `UntestedVersionError` on a megatron-core other than `TESTED_MCORE`, and `PatchTargetError`
(undoing what was applied) if a target is missing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from megatron_longgen.patches._base import AttributeSwaps, require_tested_version, resolve
from megatron_longgen.patches.cpu_torch import call_now, cpu_view_of_torch, on_cpu_tensor_methods

TESTED_MCORE = ("0.16.1", "0.19.2")

# Module -> the CUDA calls in it that the CPU runs reach (the same modules in 0.16.1 and 0.19.2).
_TORCH_VIEW_MODULES = {
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor (device=current_device(), SP buffers); "
    "local_multi_tensor_l2_norm (device='cuda', grad norm without apex)",
    "megatron.core.tensor_parallel.random": "CudaRNGStatesTracker.add / fork, model_parallel_cuda_manual_seed, "
    "activation-recompute RNG save/restore (CUDA RNG state)",
    "megatron.core.tensor_parallel.layers": "LinearWithGradAccumulationAndAsyncCommunication.backward "
    "(SP all-gather buffer on current_device())",
    "megatron.core.tensor_parallel.mappings": "_gather_along_first_dim, _reduce_scatter_along_first_dim "
    "(current_device())",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding.get_emb "
    "(inv_freq.to(current_device()))",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "YarnRotaryEmbedding.get_emb "
    "(current_device())",
    "megatron.core.models.common.embeddings.rope_utils": "get_pos_emb_on_this_cp_rank "
    "(pin_memory=True index tensor, CP > 1)",
    "megatron.core.distributed.param_and_grad_buffer": "_ParamAndGradBuffer.__init__ (buffers on "
    "current_device()); 0.19: bucket sync waits on current_stream()",
    "megatron.core.optimizer.optimizer": "MixedPrecisionOptimizer / FP32Optimizer.__init__ (device='cuda' "
    "scalars)",
    "megatron.core.optimizer.clip_grads": "get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 (device='cuda')",
    "megatron.core.optimizer.distrib_optimizer": "get_parameter_state_dp_zero (current_device())",
    "megatron.core.pipeline_parallel.schedules": "every schedule's token counter (device='cuda')",
    "megatron.core.pipeline_parallel.p2p_communication": "_communicate (receive buffers on "
    "current_device(), synchronize())",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "preload_tensors (synchronize())",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save_state_dict_async_finalize "
    "(failure flag on current_device())",
}

# Function -> the tensor-method CUDA idiom in it.
_TENSOR_METHOD_FUNCTIONS = {
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": "asserts grad.type() == "
    "'torch.cuda.FloatTensor'",
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__": "accepts only "
    "torch.cuda.{Half,BFloat16,Float}Tensor params (bf16 without the distributed optimizer)",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__": "classifies params by "
    "torch.cuda.*Tensor type (in _build_model_and_main_param_groups and __init__)",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.get_parameter_state_dp_zero": "send "
    "buffers .cuda() (optimizer checkpoint, dp_zero formats)",
    "megatron.core.models.common.embeddings.rope_utils:get_pos_emb_on_this_cp_rank": "index tensor "
    ".cuda(non_blocking=True)",
    "megatron.core.models.common.language_module.language_module:LanguageModule."
    "setup_embeddings_and_output_layer": "tied embedding weight.data.cuda() before the PP all-reduce",
}

_lock = threading.RLock()
_swaps: AttributeSwaps | None = None
_users = 0
_process_wide = False


def _apply() -> AttributeSwaps:
    require_tested_version(
        patch="megatron_longgen's CPU patches", package="megatron-core", tested=TESTED_MCORE
    )
    swaps = AttributeSwaps()
    try:
        view = cpu_view_of_torch()
        for module_name in _TORCH_VIEW_MODULES:
            module, _ = resolve(f"{module_name}:torch")
            swaps.replace(module, "torch", view)
        random_module, _ = resolve("megatron.core.tensor_parallel.random:_lazy_call")
        swaps.replace(random_module, "_lazy_call", call_now)
        for path in _TENSOR_METHOD_FUNCTIONS:
            swaps.wrap(path, on_cpu_tensor_methods)
    except BaseException:
        swaps.undo()
        raise
    return swaps


def _acquire() -> None:
    global _swaps, _users
    with _lock:
        if _swaps is None:
            _swaps = _apply()
        _users += 1


def _release() -> None:
    global _swaps, _users
    with _lock:
        _users -= 1
        if _users == 0 and _swaps is not None:
            _swaps.undo()
            _swaps = None


@contextlib.contextmanager
def cpu_patches() -> Iterator[bool]:
    """Apply the CPU patches for the duration of the block (yields False, changing nothing, with CUDA)."""
    if torch.cuda.is_available():
        yield False
        return
    _acquire()
    try:
        yield True
    finally:
        _release()


def apply_cpu_patches() -> bool:
    """Apply the CPU patches until `remove_cpu_patches()`; for a CPU process's entry point. Idempotent;
    returns whether they are active (False where CUDA is available)."""
    global _process_wide
    if torch.cuda.is_available():
        return False
    with _lock:
        if not _process_wide:
            _acquire()
            _process_wide = True
    return True


def remove_cpu_patches() -> None:
    """Undo `apply_cpu_patches()` (blocks still inside `cpu_patches()` keep theirs until they exit)."""
    global _process_wide
    with _lock:
        if _process_wide:
            _process_wide = False
            _release()


def cpu_patches_active() -> bool:
    return _swaps is not None


@contextlib.contextmanager
def cpu_patches_suspended() -> Iterator[None]:
    """Upstream as installed for the block, whoever applied the CPU patches before; their state is
    restored after (for tests that must see upstream unpatched in a process an entry point patched)."""
    global _swaps, _users, _process_wide
    with _lock:
        saved = (_users, _process_wide)
        if _swaps is not None:
            _swaps.undo()
            _swaps = None
        _users, _process_wide = 0, False
        try:
            yield
        finally:
            if _swaps is not None:  # applied inside the block and not released
                _swaps.undo()
                _swaps = None
            _users, _process_wide = saved
            if _users:
                _swaps = _apply()
