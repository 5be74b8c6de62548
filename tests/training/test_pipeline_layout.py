"""Pipeline stages balanced by attention cost: a pure function, checked on hand-made costs and recipes."""

import pytest

from megatron_longgen.config import apply_overrides
from megatron_longgen.recipes import llama2_7b_128k
from megatron_longgen.training.pipeline_layout import (
    balanced_stage_sizes,
    megatron_layout,
    pipeline_layout,
    pipeline_stage_sizes,
)


def test_balanced_sizes_by_hand():
    assert balanced_stage_sizes([1, 1, 1, 1], num_stages=2) == [2, 2]
    # Expensive middle layers: 1 1 4 4 1 1 over 2 stages -> [1 1 4 | 4 1 1] (6 vs 6).
    assert balanced_stage_sizes([1, 1, 4, 4, 1, 1], num_stages=2) == [3, 3]
    # Over 3 stages the two expensive layers go to different stages: [1 1 | 4 | 4 1 1]? max 6; [1 1 4 | 4 | 1 1]
    # also 6; the earliest cuts win: stage sizes [2, 1, 3] has max 6 -> best is 6 with first optimum found.
    sizes = balanced_stage_sizes([1, 1, 4, 4, 1, 1], num_stages=3)
    assert sum(sizes) == 6 and all(s >= 1 for s in sizes)
    costs = [1, 1, 4, 4, 1, 1]
    bounds = [sum(sizes[:i]) for i in range(4)]
    assert max(sum(costs[bounds[i] : bounds[i + 1]]) for i in range(3)) == 6
    # The logits on the last stage push layers to the front.
    assert balanced_stage_sizes([1, 1, 1, 1], num_stages=2, last_extra=2.0) == [3, 1]
    assert balanced_stage_sizes([5, 1, 1, 1], num_stages=4) == [1, 1, 1, 1]


def test_balanced_sizes_errors():
    with pytest.raises(ValueError, match="3 stages for 2 layers"):
        balanced_stage_sizes([1, 1], num_stages=3)
    with pytest.raises(ValueError, match="must be >= 0"):
        balanced_stage_sizes([1, -1], num_stages=1)


def test_megatron_layout_form():
    assert megatron_layout([2, 1]) == [["embedding", "decoder", "decoder"], ["decoder", "loss"]]


def test_7b_128k_pp4_gives_middle_stages_fewer_layers():
    cfg = apply_overrides(llama2_7b_128k(), ["parallel.pipeline_parallel=4"])
    sizes = pipeline_stage_sizes(cfg)
    assert sum(sizes) == 32 and len(sizes) == 4
    # The full layers sit in the middle: middle stages hold fewer (dearer) layers than the outer ones.
    assert sizes[1] < sizes[0] and sizes[2] < sizes[3]
    even = apply_overrides(cfg, ["train.pipeline_layout=even"])
    assert pipeline_stage_sizes(even) is None and pipeline_layout(even) is None
    # The full-attention baseline has equal layer costs: an (almost) even split, logits shift one layer.
    full = apply_overrides(cfg, ["model.layer_pattern=" + "F" * 32])
    assert max(pipeline_stage_sizes(full)) - min(pipeline_stage_sizes(full)) <= 1


def test_layout_reaches_megatron_transformer_config():
    from megatron.core.transformer.enums import LayerType

    from megatron_longgen.megatron_bridge import to_transformer_config

    cfg = apply_overrides(
        llama2_7b_128k(),
        ["parallel.sequence_parallel=false", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=4"],
    )
    tcfg = to_transformer_config(cfg)
    sizes = pipeline_stage_sizes(cfg)
    layout = tcfg.pipeline_model_parallel_layout.layout  # [pp_rank][vp_stage] -> layer types
    assert [layout[r][0].count(LayerType.decoder) for r in range(4)] == sizes
    assert layout[0][0][0] == LayerType.embedding and layout[3][0][-1] == LayerType.loss
