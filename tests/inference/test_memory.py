"""The long path never materialises an [S, S] tensor: every tensor any aten op returns during a 4K-token
prefill and the decode steps after it stays far below S * S elements (the dense oracle does not)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.inference.reference import oracle_logits, oracle_model, tiny_config, tiny_model

SEQ = 4096


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) returned by any aten op while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("variant", ["sink_window", "block_strided"])
@torch.no_grad()
def test_prefill_and_decode_stay_linear(variant):
    # LongGen-like proportions: 16-token blocks, a 4-block window, a stride of 32 blocks (512 tokens).
    config = tiny_config(layer_pattern="SFS", variant=variant, block_size=16, num_window_blocks=4,
                         stride_blocks=32, num_local_blocks=2)  # fmt: skip
    model = tiny_model(config, seed=3)
    ids = torch.randint(0, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with LargestTensor() as prefill:
        out = model(ids, use_cache=True, logits_to_keep=1)
    cache = out.cache if hasattr(type(out), "cache") else out.past_key_values
    with LargestTensor() as decode:
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out = model(nxt, cache=cache, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
    limit = SEQ * SEQ // 4
    assert prefill.numel < limit, f"prefill: {prefill.op} returned {prefill.numel} elements"
    assert decode.numel < limit, f"decode: {decode.op} returned {decode.numel} elements"
    # The instrument does see quadratic tensors: the dense-mask oracle builds [S, S] masks.
    short = ids[:, :1024]
    with LargestTensor() as dense:
        oracle_logits(oracle_model(model), short)
    assert dense.numel >= 1024 * 1024
