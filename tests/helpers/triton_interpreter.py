"""Gate for the CPU tests that run Triton kernels under its interpreter (`TRITON_INTERPRET=1`)."""

from __future__ import annotations

import pytest

from megatron_longgen.utils.optional import has_triton

MIN_INTERPRETER = "3.7"
"""Triton 3.6's interpreter fails on the kernels' scalar loads ("only 0-dimensional arrays can be converted
to Python scalars"); compiled on a GPU, 3.6 runs them (the `gpu` tests). 3.7.1 is what torch 2.13 pins."""


def require_triton_interpreter() -> None:
    """Skip the calling test (or fixture) unless a Triton with a working interpreter is installed."""
    if not has_triton():
        pytest.skip("triton is not installed (pip install triton==3.7.1 for the interpreter tests)")
    import triton
    from packaging.version import Version

    if Version(triton.__version__) < Version(MIN_INTERPRETER):
        pytest.skip(
            f"the Triton {triton.__version__} interpreter cannot run these kernels (needs triton >= {MIN_INTERPRETER})"
        )
