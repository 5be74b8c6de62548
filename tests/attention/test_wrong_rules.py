"""Meta-tests: the kernel-vs-oracle checks catch a wrong sparse rule.

Every kernel builds its tables from `SparsePattern.block_rule`. Here a deliberately wrong rule is patched
in (a window one block too wide; a doubled stride; a missing sink) and each kernel that runs on CPU (the
PyTorch block kernel, FlexAttention eagerly, the core attention module) is compared, as the real tests do,
with the oracle on the independently written mask (tests/attention/independent_masks.py): the outputs
must disagree far beyond the tests' tolerance. Against an oracle derived from the same (wrong) rule, as the
kernel tests used to be, they agree, which is the blind spot these tests close. The Triton kernel's
version of this check runs in the interpreter (test_kernels.py::test_wrong_rule_fails_the_triton_check).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_longgen.attention.kernels.flex import FlexSparseKernel
from megatron_longgen.attention.kernels.torch_kernel import TorchBlockSparseKernel
from megatron_longgen.attention.masks import BlockStridedPattern, SinkWindowPattern
from megatron_longgen.attention.reference import reference_attention
from tests.attention.independent_masks import independent_token_mask

TOL = 2e-5  # the kernel tests' fp32 tolerance


def _window_off_by_one(self, qb, kb):
    return (kb <= qb) & ((kb < self.num_sink_blocks) | (qb - kb < self.num_window_blocks + 1))


def _no_sink(self, qb, kb):
    return (kb <= qb) & (qb - kb < self.num_window_blocks)


def _doubled_stride(self, qb, kb):
    return (kb <= qb) & ((qb - kb < self.num_local_blocks) | (kb % (2 * self.stride_blocks) == 0))


WRONG = {
    "window_off_by_one": (
        SinkWindowPattern,
        _window_off_by_one,
        SinkWindowPattern(block_size=16, num_window_blocks=3),
    ),
    "no_sink": (SinkWindowPattern, _no_sink, SinkWindowPattern(block_size=16, num_window_blocks=3)),
    "doubled_stride": (
        BlockStridedPattern,
        _doubled_stride,
        BlockStridedPattern(block_size=16, stride_blocks=2, num_local_blocks=1),
    ),
}
KERNELS = {
    "torch": lambda: TorchBlockSparseKernel(),
    "flex_eager": lambda: FlexSparseKernel(block_m=32, block_n=32, compiled=False),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Eager Flex traces the mask function with dynamo, whose cache does not notice a class method patched
    between calls; start and end each test with an empty cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kernel_name", list(KERNELS))
@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_rule_fails_the_independent_oracle(monkeypatch, wrong, kernel_name):
    cls, rule, pattern = WRONG[wrong]
    S = 160  # 10 blocks: past the window, several stride blocks
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
    right = independent_token_mask(pattern, S)
    monkeypatch.setattr(cls, "block_rule", rule)
    assert not torch.equal(pattern.dense_mask(S), right), "the wrong rule must change the mask at this length"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
        out, _ = KERNELS[kernel_name]()(q, k, v, pattern=pattern)
    independent, _ = reference_attention(q, k, v, right)
    same_rule, _ = reference_attention(q, k, v, pattern.dense_mask(S))
    assert (out - independent).abs().max() > 100 * TOL, "the independent oracle missed a wrong rule"
    assert (out - same_rule).abs().max() <= TOL  # an oracle built from the rule itself would not


def test_the_correct_rule_passes_the_same_check():
    pattern = WRONG["doubled_stride"][2]
    S = 160
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 16) for _ in range(3))
    out, _ = TorchBlockSparseKernel()(q, k, v, pattern=pattern)
    ref, _ = reference_attention(q, k, v, independent_token_mask(pattern, S))
    assert (out - ref).abs().max() <= TOL
