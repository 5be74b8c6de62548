"""The one compatibility layer that lets Megatron-Core 0.16.1 run on CPU (tests, the tiny demo).

Megatron-Core assumes CUDA in a handful of places (notes/feasibility_cpu.md §2.1 lists each, verified on
torch 2.13.0+cpu): the model-parallel RNG tracker reads the CUDA RNG, RoPE and p2p move tensors to
`torch.cuda.current_device()`, checkpoint saving calls `torch.cuda.synchronize()`, the optimizer and grad
clipping create `device='cuda'` tensors and check `tensor.type() == 'torch.cuda.FloatTensor'`, and CP's
RoPE slicing uses `pin_memory=True`.

`enable_cpu_compat()` patches exactly those, and is a no-op when CUDA is available, so GPU runs never go
through it. It is idempotent and process-wide (Megatron reads these functions at call time).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means a CUDA ordinal in torch's APIs.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU and makes CPU float tensors report CUDA type strings."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # Megatron asserts e.g. `param.type() == 'torch.cuda.FloatTensor'`.
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]) and not isinstance(args[1], int):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _NoStream:
    def wait_event(self, *args, **kwargs):
        return None

    def wait_stream(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None


def enable_cpu_compat() -> bool:
    """Patch Megatron-Core's CUDA assumptions for a CPU-only process. Returns True if it patched."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: None

    import megatron.core.tensor_parallel.random as mpu_random

    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    def _add(self, name, seed):
        # Same bookkeeping as CudaRNGStatesTracker.add (0.16.1), on the CPU generator.
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)
        self.seeds_.add(seed)

    mpu_random.CudaRNGStatesTracker.add = _add
    _CudaToCpuMode().__enter__()  # stays active for the whole process
    _ENABLED = True
    return True


def is_cpu_compat_enabled() -> bool:
    return _ENABLED
