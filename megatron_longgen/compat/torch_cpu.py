"""A workaround for a first-call race in the CPU math library torch uses for `torch.exp` / `torch.log`.

Seen with torch 2.13.0+cpu (built with MKL, 2 OpenMP threads): in about one fresh process in eight, the
first multithreaded `torch.exp` of the process computes one thread's share of the tensor with a relative
error of ~1.5e-4 (a low-accuracy code path; the other share, and every later call, is accurate to 1 ulp).
That made the dense oracle, and any CPU kernel that is the first to call `exp` in a process, differ from
itself by ~1e-4 — enough to fail a 2e-5 oracle comparison or a bit-exact resume check now and then. One
throw-away call per process, wide enough to engage every thread, avoids it (0 in 48 processes after,
6 in 48 before; `tests/compat/test_torch_cpu.py`). The modules that call `exp` on CPU call
`warm_up_cpu_math()` at import; it is idempotent and costs well under a millisecond.
"""

from __future__ import annotations

import functools

import torch

_GRAIN = 32768  # at::internal::GRAIN_SIZE: elements per thread of a pointwise op


@functools.cache
def warm_up_cpu_math() -> None:
    """Run one multithreaded `exp` and `log` on CPU, once per process (see the module docstring)."""
    x = torch.zeros(_GRAIN * max(2, torch.get_num_threads()))
    torch.log(torch.exp(x))
