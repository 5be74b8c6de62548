"""Dense per-step kernels of ring attention: forward returns (out, lse), backward takes the merged
(global) out and lse.

Legend: B = batch, N = query heads, G = KV heads, S = query length, T = key length, H = head dim.

Ring attention needs, per step, a dense attention over one (query chunk, key chunk) pair that
- returns the fp32 log-sum-exp with the output, so partial results can be merged exactly, and
- has a backward that accepts the *final* out and lse (not the step's): with those, the softmax
  probabilities it recomputes are already globally normalised and the step's dQ/dK/dV are exact
  contributions (the FlashAttention-2 backward form, dS = P * (dP - rowsum(dO * O))).
`causal=True` is used only for square diagonal steps (top-left aligned causal mask).

Implementations (chosen once by `attention/backends.py`, logged, never silently replaced):
- `math`:   explicit fp32 matmuls; the oracle's arithmetic. CPU tests; any device, small shapes only.
- `flash`:  torch's FlashAttention-2 ops (`aten._scaled_dot_product_flash_attention[_backward]`), CUDA,
            fp16/bf16. No [S, T] tensor.
- `cudnn`:  torch's cuDNN SDPA ops (`aten._scaled_dot_product_cudnn_attention[_backward]`), CUDA,
            fp16/bf16; the fastest dense kernel on Hopper in our measurements.
Fast kernels take KV heads expanded to N heads when G < N (GQA); their K/V gradients are summed back to
G heads. Communication always moves G heads.
"""

from __future__ import annotations

import abc
import math

import torch

from megatron_longgen.compat.torch_cpu import warm_up_cpu_math

warm_up_cpu_math()  # before this module's first exp on CPU (compat/torch_cpu.py)


def _expand(x_BGTH: torch.Tensor, num_heads: int) -> torch.Tensor:
    groups = x_BGTH.shape[1]
    return x_BGTH if groups == num_heads else x_BGTH.repeat_interleave(num_heads // groups, dim=1)


def _reduce(dx_BNTH: torch.Tensor, groups: int) -> torch.Tensor:
    b, n, t, h = dx_BNTH.shape
    if n == groups:
        return dx_BNTH
    return dx_BNTH.view(b, groups, n // groups, t, h).sum(dim=2)


class DenseStepKernel(abc.ABC):
    """Interface: `forward(q, k, v, causal=, scale=) -> (out, lse)`; `backward(...) -> (dq, dk, dv)`."""

    name = "base"

    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls, *, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when the kernel runs on `device` with `dtype`, else a one-line reason."""

    @abc.abstractmethod
    def forward(self, q_BNSH, k_BGTH, v_BGTH, *, causal: bool, scale: float):
        """One ring step's attention: (out_BNSH, lse_BNS fp32)."""

    @abc.abstractmethod
    def backward(self, dout_BNSH, q_BNSH, k_BGTH, v_BGTH, out_BNSH, lse_BNS, *, causal: bool, scale: float):
        """Gradients of that step: (dq_BNSH, dk_BGTH, dv_BGTH)."""


class MathStepKernel(DenseStepKernel):
    """fp32 explicit-score attention (materialises [B, N, S, T]: tests and small shapes)."""

    name = "math"

    @classmethod
    def unavailable_reason(cls, *, device, dtype):
        return None

    @staticmethod
    def _scores(q, k, causal, scale):
        s = torch.matmul(q.float(), _expand(k, q.shape[1]).float().transpose(-1, -2)) * scale
        if causal:
            S, T = s.shape[-2:]
            keep = torch.ones(S, T, dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        return s

    def forward(self, q_BNSH, k_BGTH, v_BGTH, *, causal, scale):
        s = self._scores(q_BNSH, k_BGTH, causal, scale)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.unsqueeze(-1))
        out = torch.matmul(p, _expand(v_BGTH, q_BNSH.shape[1]).float())
        return out.to(q_BNSH.dtype), lse

    def backward(self, dout_BNSH, q_BNSH, k_BGTH, v_BGTH, out_BNSH, lse_BNS, *, causal, scale):
        n, g = q_BNSH.shape[1], k_BGTH.shape[1]
        s = self._scores(q_BNSH, k_BGTH, causal, scale)
        p = torch.exp(s - lse_BNS.float().unsqueeze(-1))  # globally normalised probabilities
        do = dout_BNSH.float()
        v = _expand(v_BGTH, n).float()
        dv = torch.matmul(p.transpose(-1, -2), do)
        dp = torch.matmul(do, v.transpose(-1, -2))
        delta = (do * out_BNSH.float()).sum(dim=-1, keepdim=True)
        ds = p * (dp - delta)
        dq = torch.matmul(ds, _expand(k_BGTH, n).float()) * scale
        dk = torch.matmul(ds.transpose(-1, -2), q_BNSH.float()) * scale
        return dq, _reduce(dk, g), _reduce(dv, g)


class FlashStepKernel(DenseStepKernel):
    """FlashAttention-2 inside torch (CUDA, fp16/bf16)."""

    name = "flash"

    @classmethod
    def unavailable_reason(cls, *, device, dtype):
        if device.type != "cuda":
            return f"needs CUDA, got {device.type}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"needs fp16/bf16, got {dtype}"
        return None

    def forward(self, q_BNSH, k_BGTH, v_BGTH, *, causal, scale):
        n = q_BNSH.shape[1]
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            q_BNSH, _expand(k_BGTH, n), _expand(v_BGTH, n), 0.0, causal, False, scale=scale
        )
        return res[0], res[1]

    def backward(self, dout_BNSH, q_BNSH, k_BGTH, v_BGTH, out_BNSH, lse_BNS, *, causal, scale):
        n, g = q_BNSH.shape[1], k_BGTH.shape[1]
        S, T = q_BNSH.shape[2], k_BGTH.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout_BNSH.contiguous(),
            q_BNSH,
            _expand(k_BGTH, n),
            _expand(v_BGTH, n),
            out_BNSH.contiguous(),
            lse_BNS.contiguous(),
            None,
            None,
            S,
            T,
            0.0,
            causal,
            None,
            None,
            scale=scale,
        )
        return dq, _reduce(dk, g), _reduce(dv, g)


class CudnnStepKernel(DenseStepKernel):
    """cuDNN SDPA inside torch (CUDA, fp16/bf16)."""

    name = "cudnn"

    @classmethod
    def unavailable_reason(cls, *, device, dtype):
        return FlashStepKernel.unavailable_reason(device=device, dtype=dtype)

    def forward(self, q_BNSH, k_BGTH, v_BGTH, *, causal, scale):
        n = q_BNSH.shape[1]
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q_BNSH, _expand(k_BGTH, n), _expand(v_BGTH, n), None, True, 0.0, causal, False, scale=scale
        )
        b, _, s, _ = q_BNSH.shape
        return res[0], res[1].reshape(b, n, s)

    def backward(self, dout_BNSH, q_BNSH, k_BGTH, v_BGTH, out_BNSH, lse_BNS, *, causal, scale):
        n, g = q_BNSH.shape[1], k_BGTH.shape[1]
        S, T = q_BNSH.shape[2], k_BGTH.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout_BNSH.contiguous(),
            q_BNSH,
            _expand(k_BGTH, n),
            _expand(v_BGTH, n),
            out_BNSH.contiguous(),
            lse_BNS.contiguous().unsqueeze(-1),
            None,
            None,
            None,
            None,
            None,
            S,
            T,
            0.0,
            causal,
            scale=scale,
        )
        return dq, _reduce(dk, g), _reduce(dv, g)


STEP_KERNELS: dict[str, type[DenseStepKernel]] = {
    k.name: k for k in (CudnnStepKernel, FlashStepKernel, MathStepKernel)
}
"""Ring step kernels by name, fastest first (the order `attention/backends.py` walks for `auto`)."""


def step_kernel(name: str, *, device: torch.device | str, dtype: torch.dtype) -> DenseStepKernel:
    """The ring step kernel called `name`; ValueError when it is unknown or cannot run on device/dtype."""
    device = torch.device(device)
    if name not in STEP_KERNELS:
        raise ValueError(f"unknown ring step kernel {name!r}; choose from {list(STEP_KERNELS)}")
    reason = STEP_KERNELS[name].unavailable_reason(device=device, dtype=dtype)
    if reason is not None:
        raise ValueError(f"ring step kernel {name!r} cannot run on {device.type}/{dtype}: {reason}")
    return STEP_KERNELS[name]()


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
