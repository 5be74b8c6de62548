"""Pure tests of the key tables and named transforms (no Megatron, no transformers)."""

import pytest
import torch

from megatron_longgen.checkpoint.hf_mapping import LLAMA_MAPPING, check_coverage, expand_mapping
from megatron_longgen.checkpoint.transforms import (
    TRANSFORMS,
    TransformContext,
    fuse_gate_up,
    pack_qkv,
    pad_vocab,
    split_gate_up,
    strip_vocab,
    unpack_qkv,
)

CTX_GQA = TransformContext(
    num_attention_heads=4, num_query_groups=2, head_dim=2, vocab_size=5, padded_vocab_size=8
)


def _rows_with_value(num_rows: int, start: float, width: int = 3) -> torch.Tensor:
    """Row r holds the value start + r in every column, so packed layouts can be read off column 0."""
    return (torch.arange(num_rows, dtype=torch.float32)[:, None] + start).expand(num_rows, width).contiguous()


def test_pack_qkv_groups_query_heads_with_their_kv_head():
    # q heads 0..3 (rows 0..7), k heads 0..1 (rows 100..103), v heads 0..1 (rows 200..203); head_dim 2.
    q, k, v = _rows_with_value(8, 0), _rows_with_value(4, 100), _rows_with_value(4, 200)
    packed = pack_qkv([q, k, v], CTX_GQA)
    # Group 0: q heads 0,1 then k0 then v0; group 1: q heads 2,3 then k1 then v1.
    expected = [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert packed[:, 0].tolist() == expected


def test_pack_qkv_mha_and_inverse_is_exact():
    ctx = TransformContext(
        num_attention_heads=4, num_query_groups=4, head_dim=3, vocab_size=5, padded_vocab_size=8
    )
    q, k, v = torch.randn(12, 6), torch.randn(12, 6), torch.randn(12, 6)
    packed = pack_qkv([q, k, v], ctx)
    assert packed.shape == (36, 6)
    assert packed[3:6].equal(k[0:3]) and packed[6:9].equal(v[0:3])
    for a, b in zip(unpack_qkv(packed, ctx), (q, k, v)):
        assert torch.equal(a, b)


def test_gate_up_and_vocab_round_trip():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = fuse_gate_up([gate, up], CTX_GQA)
    assert fc1[:6].equal(gate) and fc1[6:].equal(up)
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(fc1, CTX_GQA), (gate, up)))
    emb = torch.randn(5, 4)
    padded = pad_vocab([emb], CTX_GQA)
    assert padded.shape == (8, 4) and padded[5:].abs().sum() == 0
    assert torch.equal(strip_vocab(padded, CTX_GQA)[0], emb)


def test_shape_errors_name_the_numbers():
    with pytest.raises(ValueError, match="expected 4 rows for k_proj, got shape \\(6, 3\\)"):
        pack_qkv([torch.zeros(8, 3), torch.zeros(6, 3), torch.zeros(4, 3)], CTX_GQA)
    with pytest.raises(ValueError, match="expected 5 rows"):
        pad_vocab([torch.zeros(7, 3)], CTX_GQA)


def test_table_expansion_and_coverage():
    rows = expand_mapping(LLAMA_MAPPING, num_layers=2, tie_embeddings=False)
    assert all(row.transform in TRANSFORMS for row in rows)
    assert len(rows) == 2 + 2 * 6 + 1  # embedding, final norm, head + 6 rows per layer
    assert rows[2].mcore == "decoder.layers.0.self_attention.linear_qkv.weight"
    assert rows[2].hf[1] == "model.layers.0.self_attn.k_proj.weight"
    hf_keys = {k for row in rows for k in row.hf}
    check_coverage(rows=rows, hf_keys=hf_keys, tie_embeddings=False)
    tied = expand_mapping(LLAMA_MAPPING, num_layers=2, tie_embeddings=True)
    assert "output_layer.weight" not in {row.mcore for row in tied}
    check_coverage(rows=tied, hf_keys=hf_keys, tie_embeddings=True)  # a stored lm_head is tolerated when tied
    with pytest.raises(ValueError, match="1 HF tensors the config needs are missing.*model.norm.weight"):
        check_coverage(rows=rows, hf_keys=hf_keys - {"model.norm.weight"}, tie_embeddings=False)
    with pytest.raises(
        ValueError, match="not used by the conversion table.*model.layers.2.mlp.up_proj.weight"
    ):
        check_coverage(
            rows=rows, hf_keys=hf_keys | {"model.layers.2.mlp.up_proj.weight"}, tie_embeddings=False
        )
