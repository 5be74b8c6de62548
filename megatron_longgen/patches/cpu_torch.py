"""What selected Megatron-Core code sees of torch in a process without CUDA (building blocks of
`patches/cpu.py`, which says which Megatron modules and functions get them, per version).

Two mechanisms, each as narrow as the CUDA idiom it answers:

- `cpu_view_of_torch()` is a stand-in for the `torch` module, bound as the `torch` global of selected
  Megatron-Core modules (so only code *written in* those modules sees it; torch itself, our code and the
  model's forward are untouched). Everything is torch's own except what assumes a GPU:
    `torch.cuda.current_device()` -> "cpu"; `synchronize()` does nothing; `current_stream()` -> a stream
    whose waits do nothing; the CUDA RNG (`get_rng_state`, `manual_seed`, `random.get_rng_state`,
    `default_generators[i]`) is the CPU default generator; factory functions (`zeros`, `tensor`, ...)
    put `device="cuda"` on the CPU and ignore `pin_memory=True`.
  Attribute lookups fall through to torch on every access, so later changes to torch stay visible.
- `on_cpu_tensor_methods(fn)` wraps one Megatron function so that, while it runs, the CUDA idioms that
  are tensor *methods* act on the CPU: `t.cuda()` returns `t` (already on the only device) and `t.type()`
  names the CUDA type (`'torch.cuda.FloatTensor'`: Megatron's optimizers assert it). It is a
  `TorchFunctionMode` entered for that call only, so ops outside those functions pay nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

# torch factory functions that take `device=` / `pin_memory=`; the ones Megatron-Core calls with
# device="cuda" are `zeros`, `tensor`, `empty` and `ones`, the others keep the view consistent.
_FACTORIES = (
    "arange", "as_tensor", "empty", "empty_like", "full", "full_like", "ones", "ones_like",
    "rand", "randint", "randn", "tensor", "zeros", "zeros_like",
)  # fmt: skip


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device is a CUDA ordinal in torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _Fallthrough:
    """Attributes set here win; everything else is read from `real` on each access."""

    def __init__(self, real, name: str, **overrides) -> None:
        self.__dict__.update(overrides)
        self._real = real
        self._name = name

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def __repr__(self) -> str:
        return f"<CPU view of {self._name}>"


class _NoopStream:
    """The stream Megatron's DDP waits on and records into: with one CPU device nothing runs async."""

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event=None) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _EveryDevice:
    """`torch.cuda.default_generators[i]` for any i: the CPU default generator."""

    def __getitem__(self, index):
        return torch.default_generator

    def __len__(self) -> int:
        return 1


def _current_device() -> str:
    return "cpu"


def _synchronize(device=None) -> None:
    return None


def _current_stream(device=None) -> _NoopStream:
    return _NoopStream()


def _get_rng_state(device="cuda") -> torch.Tensor:
    return torch.get_rng_state()


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _on_cpu(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def cpu_factory(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs an accelerator; CPU-to-CPU copies need none
        return factory(*args, **kwargs)

    return cpu_factory


def cpu_view_of_torch() -> _Fallthrough:
    """A fresh stand-in for the `torch` module (see the module docstring)."""
    cuda = _Fallthrough(
        torch.cuda,
        "torch.cuda",
        current_device=_current_device,
        synchronize=_synchronize,
        current_stream=_current_stream,
        get_rng_state=_get_rng_state,
        manual_seed=_manual_seed,
        random=_Fallthrough(torch.cuda.random, "torch.cuda.random", get_rng_state=_get_rng_state),
        default_generators=_EveryDevice(),
    )
    factories = {name: _on_cpu(getattr(torch, name)) for name in _FACTORIES}
    return _Fallthrough(torch, "torch", cuda=cuda, **factories)


def call_now(callable_, **kwargs) -> None:
    """Stand-in for `torch.cuda._lazy_call`: a CPU process has no CUDA initialisation to wait for, so a
    callback (Megatron's RNG-state setter) runs at once instead of being queued for ever."""
    callable_()


class _TensorMethodsOnCpu(TorchFunctionMode):
    # Inside __torch_function__ the mode is off the stack, so calling `func` does not recurse.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **(kwargs or {}))


def on_cpu_tensor_methods(fn: Callable) -> Callable:
    """Wrap `fn` so that `t.cuda()` and `t.type()` act on the CPU while (and only while) it runs."""

    @functools.wraps(fn)
    def run_on_cpu(*args, **kwargs):
        with _TensorMethodsOnCpu():
            return fn(*args, **kwargs)

    return run_on_cpu
