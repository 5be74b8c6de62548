"""GPU specifications for the planner: memory, peak and *achieved* rates, interconnect bandwidths.

Every rate is what a kernel of this project (or the library it calls) achieves, not a datasheet peak, so
that the planner's step time is comparable with measured steps. Sources:

- Peaks, memory, HBM and NVLink / InfiniBand figures: NVIDIA datasheets (H100 SXM5 80GB: 989 dense bf16
  TFLOP/s, 3.35 TB/s HBM3, NVLink 4 at 900 GB/s bidirectional; H200 SXM: same compute, 4.8 TB/s HBM3e,
  141 GB; A100 SXM4 80GB: 312 TFLOP/s, 2.04 TB/s, NVLink 3 at 600 GB/s) and the DGX H100 / DGX A100
  reference designs (one 400 Gb/s NDR, resp. 200 Gb/s HDR, InfiniBand port per GPU).
- Achieved rates on the H200 were measured by this project (`benchmarks/results/`):
  dense causal attention (cuDNN through SDPA) fwd 576 / bwd 525 TFLOP/s at 128K
  (`cudnn_bsa_rates_h200.json`); sparse attention fwd / bwd at 128K: Triton sink_window 357 / 300,
  block_strided 321 / 240 (`attention_h200_final.json`), cuDNN block-sparse sink_window 534 / 354
  (`cudnn_bsa_rates_h200.json`), the context-parallel FlexAttention kernel (the sparse kernel under CP)
  305 / 258 for sink_window and 98 / 96 for block_strided (`context_parallel_h200.json`, CP=1 rows); bf16
  GEMM ~790 TFLOP/s (DESIGN.md; `tools/bench_train_step.py` re-measures it in its `rates` section).
- H100: the same GH100 compute as the H200 (same SM count, clocks and power limit), so compute-bound rates
  are the H200's; memory-bound work scales with HBM bandwidth. Not measured by this project.
- A100: compute rates are the H200's scaled by the peak ratio (312 / 989); not measured by this project.
- Achievable fractions of link peaks: 85% of HBM (streaming kernels), NCCL bus bandwidth ~360 GB/s over
  NVLink 4 and ~230 GB/s over NVLink 3, ~90% of the InfiniBand line rate. Latency per collective: 15 us
  inside a node, 30 us across nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One accelerator model as the planner sees it (rates in TFLOP/s, bandwidths in GB/s = 1e9 B/s)."""

    name: str
    """Key used on the command line (`--gpu h100-80gb`)."""
    description: str
    memory_gib: float
    """Total device memory as torch reports it (`torch.cuda.get_device_properties().total_memory`)."""
    reserved_gib: float = 2.5
    """Memory the PyTorch allocator never hands out: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers."""
    fragmentation: float = 0.05
    """Share of the rest lost to allocator fragmentation (segments that cannot be reused)."""
    peak_bf16_tflops: float
    """Dense bf16 tensor-core peak (the MFU denominator)."""
    matmul_tflops: float
    """Achieved bf16 GEMM rate on transformer-sized matrices."""
    hbm_gbps: float
    """Achieved streaming bandwidth of element-wise kernels."""
    dense_attn_tflops: tuple[float, float]
    """Dense causal attention (forward, backward) rate, FLOPs counted on attended pairs."""
    sparse_attn_tflops: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(forward, backward) rate per `variant/backend` key, e.g. `sink_window/triton`."""
    nvlink_gbps: float
    """Achieved NCCL bus bandwidth per GPU inside a node."""
    ib_gbps: float
    """Achieved bandwidth per GPU across nodes."""
    intra_latency_s: float = 15e-6
    inter_latency_s: float = 30e-6
    measured: bool = False
    """Whether this project measured the compute rates on this GPU (H200) or derived them."""

    @property
    def usable_bytes(self) -> float:
        """Bytes the allocator can hand out: (total - reserved) * (1 - fragmentation)."""
        return (self.memory_gib - self.reserved_gib) * GIB * (1.0 - self.fragmentation)

    def sparse_rate(self, variant: str, backend: str) -> tuple[float, float]:
        """(fwd, bwd) TFLOP/s of a sparse kernel; `auto` means the Triton kernel (available everywhere,
        and the slower of the two Hopper kernels: the estimate stays on the safe side)."""
        key = f"{variant}/{'triton' if backend in ('auto', 'cudnn_bsa_fwd') else backend}"
        if key not in self.sparse_attn_tflops:
            raise ValueError(
                f"no sparse attention rate for {key} on {self.name}; known: {sorted(self.sparse_attn_tflops)}"
            )
        rate = self.sparse_attn_tflops[key]
        if backend == "cudnn_bsa_fwd":  # cuDNN forward, Triton backward
            rate = (self.sparse_attn_tflops.get(f"{variant}/cudnn_bsa", rate)[0], rate[1])
        return rate


# Measured on the H200 (see the module docstring); H100 reuses them, A100 scales them.
_H200_SPARSE = {
    "sink_window/triton": (357.0, 300.0),
    "block_strided/triton": (321.0, 240.0),
    "sink_window/cudnn_bsa": (534.0, 354.0),
    "block_strided/cudnn_bsa": (321.0, 240.0),  # routed to the Triton kernel by design (kernels/cudnn_bsa)
    # The CP modules' FlexAttention kernel (context_parallel/flex_sparse.py) at CP=1, 128K: 57.4 ms and
    # 84.9 ms fwd+bwd (context_parallel_h200.json), split fwd/bwd like the standalone Flex kernel
    # (attention_h200.json: 344/291 and 135/132 TFLOP/s).
    "sink_window/flex": (305.0, 258.0),
    "block_strided/flex": (98.0, 96.0),
}


def _scaled(rates: dict[str, tuple[float, float]], factor: float) -> dict[str, tuple[float, float]]:
    return {k: (f * factor, b * factor) for k, (f, b) in rates.items()}


GPUS: dict[str, GpuSpec] = {
    "h200": GpuSpec(
        name="h200",
        description="NVIDIA H200 SXM 141GB",
        memory_gib=139.8,
        peak_bf16_tflops=989.0,
        matmul_tflops=790.0,
        hbm_gbps=0.85 * 4800.0,
        dense_attn_tflops=(576.0, 525.0),
        sparse_attn_tflops=_H200_SPARSE,
        nvlink_gbps=360.0,
        ib_gbps=0.9 * 50.0,
        measured=True,
    ),
    "h100-80gb": GpuSpec(
        name="h100-80gb",
        description="NVIDIA H100 SXM5 80GB",
        memory_gib=79.6,
        peak_bf16_tflops=989.0,
        matmul_tflops=790.0,
        hbm_gbps=0.85 * 3350.0,
        dense_attn_tflops=(576.0, 525.0),
        sparse_attn_tflops=_H200_SPARSE,
        nvlink_gbps=360.0,
        ib_gbps=0.9 * 50.0,
    ),
    "a100-80gb": GpuSpec(
        name="a100-80gb",
        description="NVIDIA A100 SXM4 80GB",
        memory_gib=79.2,
        peak_bf16_tflops=312.0,
        matmul_tflops=790.0 * 312.0 / 989.0,
        hbm_gbps=0.85 * 2039.0,
        dense_attn_tflops=(576.0 * 312.0 / 989.0, 525.0 * 312.0 / 989.0),
        # cuDNN block-sparse attention needs Hopper; the rest scaled by the peak ratio.
        sparse_attn_tflops={
            k: v for k, v in _scaled(_H200_SPARSE, 312.0 / 989.0).items() if "cudnn" not in k
        },
        nvlink_gbps=230.0,
        ib_gbps=0.9 * 25.0,
    ),
}


def get_gpu(name: str) -> GpuSpec:
    """The spec for `--gpu NAME` (case-insensitive); ValueError listing the known names otherwise."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPUS)} (add one to launch/gpus.py)")
    return GPUS[key]


def gpu_from_device_name(device_name: str) -> GpuSpec | None:
    """Map a CUDA device name ('NVIDIA H100 80GB HBM3', 'NVIDIA H200') to a spec; None when unknown."""
    upper = device_name.upper()
    if "H200" in upper:
        return GPUS["h200"]
    if "H100" in upper:
        return GPUS["h100-80gb"]
    if "A100" in upper and "80" in upper:
        return GPUS["a100-80gb"]
    return None


def detect_gpu() -> GpuSpec | None:
    """The spec of this process's CUDA device (None on CPU or for a GPU not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return gpu_from_device_name(torch.cuda.get_device_name())
