"""The hybrid GPTModel on one process: structure from the pattern, forward/backward, and equivalences."""

import dataclasses

import pytest
import torch

from megatron_longgen.attention.core_attention import LongGenCoreAttention
from megatron_longgen.config import (
    LongGenConfig,
    ModelConfig,
    ParallelConfig,
    SparseAttentionConfig,
    TrainingConfig,
)
from megatron_longgen.models.builder import build_model, model_vocab_size
from megatron_longgen.utils.distributed import init_distributed, initialize_model_parallel, set_seed


def tiny_cfg(pattern="SFFS", **sparse_kw) -> LongGenConfig:
    sparse = {"variant": "sink_window", "block_size": 4, "num_window_blocks": 2, "backend": "torch"}
    sparse.update(sparse_kw)
    return LongGenConfig(
        name="tiny",
        model=ModelConfig(
            num_layers=len(pattern),
            hidden_size=32,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=64,
            vocab_size=100,
            layer_pattern=pattern,
        ),
        sparse=SparseAttentionConfig(**sparse),
        parallel=ParallelConfig(use_distributed_optimizer=False),
        train=TrainingConfig(seq_length=48, max_steps=1, dtype="fp32"),
    )


@pytest.fixture(scope="module", autouse=True)
def _single_process():
    init_distributed()
    yield


def _build(cfg, seed=0):
    initialize_model_parallel(cfg)
    set_seed(seed)
    return build_model(cfg)


def _core_kinds(model):
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert all(isinstance(c, LongGenCoreAttention) for c in cores)
    return [{"sparse": "S", "full": "F"}[c.kind] for c in cores]


def _batch(seed=0, batch=2, seq=48, vocab=100):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, torch.arange(seq)[None].expand(batch, -1)


def test_pattern_decides_each_layer():
    assert _core_kinds(_build(tiny_cfg("SFFS"))) == list("SFFS")
    assert _core_kinds(_build(tiny_cfg("FFFF"))) == list("FFFF")
    assert _core_kinds(_build(tiny_cfg("SSSF"))) == list("SSSF")


def test_forward_backward_shapes_and_finite_grads():
    cfg = tiny_cfg("SFFS")
    model = _build(cfg)
    ids, pos = _batch()
    logits = model(ids, pos, None)
    assert logits.shape == (2, 48, model_vocab_size(cfg)) and model_vocab_size(cfg) == 128
    loss = model(ids, pos, None, labels=ids).mean()
    assert abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 1.0  # near-uniform at init
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "layers" in n)


def test_hybrid_with_covering_window_equals_full_baseline():
    # With a window wider than the sequence, sparse layers are dense causal: the hybrid model and the
    # all-full baseline built from the same weights must agree (outputs and gradients).
    hybrid = _build(tiny_cfg("SFFS", num_window_blocks=64), seed=3)
    full = _build(tiny_cfg("FFFF"), seed=3)
    full.load_state_dict(hybrid.state_dict())
    ids, pos = _batch(1)
    a = hybrid(ids, pos, None, labels=ids).mean()
    b = full(ids, pos, None, labels=ids).mean()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.backward()
    b.backward()
    for (name, p), q in zip(hybrid.named_parameters(), full.parameters()):
        torch.testing.assert_close(
            p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_sparse_layers_change_the_function():
    # With the real (narrow) window the hybrid differs from the baseline on long-range tokens only.
    hybrid = _build(tiny_cfg("SFFS", num_window_blocks=2), seed=3)
    full = _build(tiny_cfg("FFFF"), seed=3)
    full.load_state_dict(hybrid.state_dict())
    ids, pos = _batch(2)
    with torch.no_grad():
        a, b = hybrid(ids, pos, None), full(ids, pos, None)
    # Queries in the first two blocks see everything in both models.
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-5)
    assert (a[:, 16:] - b[:, 16:]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["sink_window", "block_strided"])
def test_both_variants_train_a_step(variant):
    cfg = tiny_cfg("SFFS", variant=variant, stride_blocks=3, num_local_blocks=1)
    model = _build(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, pos = _batch(4)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(ids, pos, None, labels=ids).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_tensor_parallel_size_is_rejected():
    with pytest.raises(ValueError, match="num_query_groups 2 < tensor_parallel 4"):
        dataclasses.replace(tiny_cfg(), parallel=ParallelConfig(tensor_parallel=4))
