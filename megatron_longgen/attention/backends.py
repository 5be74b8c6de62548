"""The one place that decides which attention backend a LongGen layer runs, and in which form.

Legend: H = head dim, R = CP size.

Inputs: the layer kind (`sparse` / `full`), the requested backend (`SparseAttentionConfig.backend` for
sparse layers; `auto` for full ones), the device and dtype of the activations, the sparse pattern, the
head dim and the CP size R. The form follows from the kind and R:

    kind    R    form       what runs                                                   candidates, fastest first
    sparse  1    local      a whole-sequence kernel (`attention/kernels/`)              cudnn_bsa, triton, flex, torch
    sparse  >1   exchange   the KV-reduced block exchange, then a kernel over           flex, torch
                            [local | fetched] keys (`context_parallel/sparse_exchange.py`)
    full    1    local      torch SDPA (cuDNN / flash / memory-efficient inside torch)  sdpa
    full    >1   ring       zig-zag ring attention with a per-step dense kernel         cudnn, flash, math
                            (`context_parallel/ring_attention.py`, `step_kernels.py`)

(`cudnn_bsa_fwd`, cuDNN forward + Triton backward, is taken only when asked for.)

`auto` takes the first candidate that accepts the inputs and keeps why each earlier one did not; the last
candidate of every list runs everywhere, so `auto` always resolves, with a warning when that portable
kernel is all that fits a CUDA device (slow, and the dense math step kernel is [S, T] memory). A named
backend that cannot run the inputs (device, dtype, pattern, head dim, or no form for this CP size: the
whole-sequence `triton` / `cudnn_bsa` kernels have no context-parallel form) raises ValueError saying why;
there is no fallback from a named backend. Each distinct resolution is logged once per process.
"""

from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch

from megatron_longgen.attention.kernels import available_kernels
from megatron_longgen.attention.kernels.flex import flex_unavailable_reason
from megatron_longgen.attention.masks import SparsePattern
from megatron_longgen.context_parallel.sparse_exchange import EXCHANGE_KERNELS
from megatron_longgen.context_parallel.step_kernels import STEP_KERNELS

logger = logging.getLogger(__name__)

KINDS = ("sparse", "full")
CANDIDATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("sparse", "local"): ("cudnn_bsa", "triton", "flex", "torch"),
    ("sparse", "exchange"): EXCHANGE_KERNELS,
    ("full", "local"): ("sdpa",),
    ("full", "ring"): tuple(STEP_KERNELS),
}
"""Per (kind, form): the backends `auto` walks, fastest first; the last one runs everywhere."""
EXPLICIT_ONLY: dict[tuple[str, str], tuple[str, ...]] = {("sparse", "local"): ("cudnn_bsa_fwd",)}
"""Per (kind, form): backends taken only when named."""
_LOGGED: set[tuple] = set()


@dataclass(frozen=True, kw_only=True)
class ResolvedBackend:
    """The outcome of `resolve_backend`: which backend (`name`) runs a layer kind, in which `form`."""

    kind: str
    form: str
    name: str
    requested: str
    device: str
    dtype: str
    skipped: tuple[tuple[str, str], ...] = ()
    """(backend, reason) for each candidate `auto` walked past."""

    def describe(self) -> str:
        text = f"{self.kind} layers -> {self.name} ({self.form}; requested {self.requested}; {self.device}/{self.dtype})"
        if self.skipped:
            text += "; skipped " + "; ".join(f"{n}: {r}" for n, r in self.skipped)
        return text


def form_for(*, kind: str, cp_size: int) -> str:
    """`local` for R = 1; `exchange` (sparse) or `ring` (full) for R > 1."""
    if kind not in KINDS:
        raise ValueError(f"layer kind must be one of {KINDS}, got {kind!r}")
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if cp_size == 1:
        return "local"
    return "exchange" if kind == "sparse" else "ring"


def unavailable_reason(
    *,
    kind: str,
    form: str,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    pattern: SparsePattern | None,
    head_dim: int | None,
) -> str | None:
    """None when backend `name` of (kind, form) runs these inputs, else a one-line reason."""
    if (kind, form) == ("sparse", "local"):
        return available_kernels()[name].unavailable_reason(
            device=device, dtype=dtype, pattern=pattern, head_dim=head_dim
        )
    if (kind, form) == ("sparse", "exchange"):
        return (
            flex_unavailable_reason(device=device, dtype=dtype, pattern=pattern) if name == "flex" else None
        )
    if (kind, form) == ("full", "ring"):
        return STEP_KERNELS[name].unavailable_reason(device=device, dtype=dtype)
    return None  # torch SDPA picks its own inner kernel and runs everywhere


def _check_named(kind: str, form: str, requested: str, cp_size: int) -> None:
    known = CANDIDATES[(kind, form)] + EXPLICIT_ONLY.get((kind, form), ())
    if requested in known:
        return
    elsewhere = {
        n
        for table in (CANDIDATES, EXPLICIT_ONLY)
        for key, names in table.items()
        if key[0] == kind
        for n in names
    }
    if requested in elsewhere:
        where = "the whole sequence (cp 1)" if form != "local" else "context parallelism (cp > 1)"
        raise ValueError(
            f"{kind} attention backend {requested!r} runs only with {where}; with cp {cp_size} the {kind} "
            f"layers run in the {form!r} form, whose backends are {known}: set it to 'auto' or one of those"
        )
    raise ValueError(f"unknown {kind} attention backend {requested!r}; choose 'auto' or one of {known}")


def resolve_backend(
    *,
    kind: str,
    requested: str = "auto",
    device: torch.device | str,
    dtype: torch.dtype,
    pattern: SparsePattern | None = None,
    head_dim: int | None = None,
    cp_size: int = 1,
) -> ResolvedBackend:
    """Decide the backend of a `kind` layer for these inputs (module docstring); logged once per process.

    Raises ValueError for an unknown name, a named backend that cannot run the inputs (with the reason),
    or a sparse layer without a pattern.
    """
    device = torch.device(device)
    form = form_for(kind=kind, cp_size=cp_size)
    if kind == "sparse" and pattern is None:
        raise ValueError("a sparse layer's backend depends on its pattern: pass pattern=")
    reason_of = functools.partial(
        unavailable_reason,
        kind=kind,
        form=form,
        device=device,
        dtype=dtype,
        pattern=pattern,
        head_dim=head_dim,
    )
    skipped = []
    if requested == "auto":
        for name in CANDIDATES[(kind, form)]:
            reason = reason_of(name=name)
            if reason is None:
                break
            skipped.append((name, reason))
        else:  # unreachable: the last candidate of every list runs everywhere
            raise AssertionError(f"no {kind} backend runs on {device.type}/{dtype}: {skipped}")
    else:
        _check_named(kind, form, requested, cp_size)
        name = requested
        reason = reason_of(name=name)
        if reason is not None:
            raise ValueError(
                f"{kind} attention backend {name!r} ({form} form) cannot run on {device.type}/{dtype}"
                f"{'' if pattern is None else f' with {pattern}'}: {reason}. Set it to 'auto' to let the "
                f"resolver pick one that can, or to one of {CANDIDATES[(kind, form)]}"
            )
    resolved = ResolvedBackend(
        kind=kind,
        form=form,
        name=name,
        requested=requested,
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        skipped=tuple(skipped),
    )
    key = (resolved, pattern)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(
            "attention backend: %s%s", resolved.describe(), "" if pattern is None else f" [{pattern}]"
        )
        slow = name == CANDIDATES[(kind, form)][-1] and len(CANDIDATES[(kind, form)]) > 1
        if requested == "auto" and slow and device.type == "cuda":
            warnings.warn(
                f"no fast {kind} attention backend takes these inputs on {device} ({resolved.describe()}); "
                f"running the portable {name!r} kernel",
                stacklevel=2,
            )
    return resolved
