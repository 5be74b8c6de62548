"""The first `exp` of a fresh process, after importing a module that calls exp on CPU, is accurate.

Without `compat/torch_cpu.warm_up_cpu_math`, about one fresh process in eight computed one thread's share
of its first multithreaded `torch.exp` with a relative error of ~1.5e-4 (torch 2.13.0+cpu, 2 threads)."""

from __future__ import annotations

import subprocess
import sys

_PROBE = r"""
import torch
import megatron_longgen.attention.reference  # noqa: F401  (warms up at import)
torch.manual_seed(0)
a = torch.randn(4, 100, 32)
s = a @ a.transpose(-1, -2) / 8  # a matmul first: that is when the bad first exp showed (1 process in 32)
x = s - s.amax(-1, keepdim=True)
got, ref = torch.exp(x), torch.exp(x.double())
print(((got.double() - ref).abs() / ref).max().item())
"""


def test_first_exp_of_a_fresh_process_is_accurate():
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "import torch; torch.set_num_threads(2)\n" + _PROBE],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    errors = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        errors.append(float(out.split()[-1]))
    assert max(errors) < 1e-6, f"relative errors of the first exp in 8 fresh processes: {errors}"
