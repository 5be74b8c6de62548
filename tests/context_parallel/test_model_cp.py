"""Model level: a LongGen GPTModel under CP=2, CP=2 x TP=2 and CP=2 x PP=2 gives the CP=1 loss and gradients.

Four gloo ranks are started once. Each builds the same tiny hybrid model (pattern "SFFS": sparse layers
through the KV-reduced exchange, full layers through ring attention) three times, from the same seed:
TP1/CP1 on the full batch (the reference), TP1/CP2 and TP2/CP2 on its zig-zag shard of the batch
(`shard_batch_for_cp`). For CP runs the per-token losses are summed over the CP group and parameter
gradients all-reduced over it (what Megatron's DDP does over the data-parallel x CP group), then compared
with the reference; TP-sharded parameters are compared with the matching slice of the reference gradient.
Both sparse variants are covered. PP=2 x CP=2 runs through Megatron's 1F1B schedule (gloo p2p between
stages) with the reference weights copied in. RoPE is checked directly too: the rotary table GPTModel uses on a CP
rank must equal the global table at `zigzag_positions`.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier

SEQ, BATCH, VOCAB = 32, 2, 128
VARIANTS = {
    "sink_window": {
        "variant": "sink_window",
        "block_size": 4,
        "num_sink_blocks": 1,
        "num_window_blocks": 2,
        "backend": "torch",
    },
    "block_strided": {
        "variant": "block_strided",
        "block_size": 4,
        "stride_blocks": 3,
        "num_local_blocks": 2,
        "backend": "torch",
    },
}


def _cfg(variant: str, tp: int, cp: int, pp: int = 1):
    from megatron_longgen.config import (
        LongGenConfig,
        ModelConfig,
        ParallelConfig,
        SparseAttentionConfig,
        TrainingConfig,
    )

    return LongGenConfig(
        name="cp_model_test",
        model=ModelConfig(
            num_layers=4,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            vocab_size=VOCAB,
            make_vocab_size_divisible_by=16,
            layer_pattern="SFFS",
            rotary_base=10000.0,
        ),
        sparse=SparseAttentionConfig(**VARIANTS[variant]),
        parallel=ParallelConfig(
            tensor_parallel=tp, context_parallel=cp, pipeline_parallel=pp, use_distributed_optimizer=False
        ),
        train=TrainingConfig(
            seq_length=SEQ, micro_batch_size=BATCH, global_batch_size=BATCH, max_steps=1, dtype="fp32"
        ),
    )


def _batch():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    loss_mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
        "attention_mask": None,
    }


def _forms(model) -> list[str]:
    """'kind/form/backend' of every LongGen core attention of `model` (e.g. 'sparse/exchange/torch')."""
    from megatron_longgen.attention.core_attention import LongGenCoreAttention

    return sorted(
        {
            f"{m.kind}/{m.form}/{m.resolved.name}"
            for m in model.modules()
            if isinstance(m, LongGenCoreAttention)
        }
    )


def _run(variant: str, tp: int, cp: int):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_longgen.context_parallel.sharding import shard_batch_for_cp
    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    cfg = _cfg(variant, tp, cp)
    initialize_model_parallel(cfg)
    set_seed(1234)
    model = build_model(cfg)
    full = _batch()
    cp_group = ps.get_context_parallel_group()
    batch = shard_batch_for_cp(
        full, cp_rank=dist.get_rank(cp_group), cp_size=cp, block_size=cfg.sparse.block_size
    )
    per_token = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
    )
    loss = (per_token * batch["loss_mask"]).sum() / full["loss_mask"].sum()
    loss.backward()
    loss_total = loss.detach().clone()
    dist.all_reduce(loss_total, group=cp_group)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=cp_group)
        # numpy, not tensors: results cross the process boundary by value (no shared-memory handles).
        grads[name] = (
            g.numpy(),
            getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1,
        )
    rope = model.rotary_pos_emb(SEQ).detach().flatten(1).numpy()
    kinds = _forms(model)
    return {
        "loss": float(loss_total),
        "grads": grads,
        "state": {name: p.detach().clone().numpy() for name, p in model.named_parameters()},
        "rope": rope,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "cp_rank": dist.get_rank(cp_group),
        "kinds": kinds,
    }


def _run_pp(variant: str, ref_state: dict):
    """PP=2 x CP=2 through Megatron's 1F1B schedule, with the reference model's weights copied in (a
    pipeline stage draws different initial weights from the RNG than the whole model does)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longgen.context_parallel.sharding import shard_batch_for_cp
    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    cfg = _cfg(variant, 1, 2, pp=2)
    initialize_model_parallel(cfg)
    set_seed(1234)
    pp_rank, last = ps.get_pipeline_model_parallel_rank(), ps.is_pipeline_last_stage()
    model = build_model(cfg, pre_process=ps.is_pipeline_first_stage(), post_process=last)
    layers_per_stage = cfg.model.num_layers // 2

    def global_name(name: str) -> str:
        if not name.startswith("decoder.layers."):
            return name
        index, rest = name[len("decoder.layers.") :].split(".", 1)
        return f"decoder.layers.{int(index) + pp_rank * layers_per_stage}.{rest}"

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(ref_state[global_name(name)]))
    full = _batch()
    cp_group = ps.get_context_parallel_group()
    batch = shard_batch_for_cp(
        full, cp_rank=dist.get_rank(cp_group), cp_size=2, block_size=cfg.sparse.block_size
    )
    total_tokens = full["loss_mask"].sum()

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(
            input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=None, labels=b["labels"]
        )

        def loss_func(per_token):
            # Already normalised by the global token count, so the schedule's own token division (count 1
            # here) is a no-op whichever way this Megatron version applies it to the backward.
            local = (per_token * b["loss_mask"]).sum() / total_tokens
            return local, torch.ones((), dtype=torch.int), {"loss": local.detach().clone()}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    loss = losses[0]["loss"] if last else torch.zeros(())
    dist.all_reduce(loss, group=cp_group)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=cp_group)
        grads[global_name(name)] = g.numpy()
    kinds = _forms(model)
    return {"loss": float(loss) if last else None, "grads": grads, "pp_rank": pp_rank, "kinds": kinds}


def _group_errors(pair_group, cp_group):
    """Core attention refuses a CP group that does not match the config, or a missing one; given a CP
    group, it answers bad input like the CP = 1 module does (tests/attention/test_core_attention.py)."""
    import types

    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_longgen.attention.core_attention import LongGenCoreAttention
    from megatron_longgen.config import SparseAttentionConfig

    def tcfg(cp):
        return TransformerConfig(
            num_layers=1,
            hidden_size=64,
            num_attention_heads=4,
            context_parallel_size=cp,
            attention_dropout=0.0,
            use_cpu_initialization=True,
        )

    errors = {}
    for key, pgc in (("mismatch", types.SimpleNamespace(cp=pair_group)), ("missing", None)):
        try:
            LongGenCoreAttention(tcfg(4), 1, AttnMaskType.causal, "self", pg_collection=pgc, kind="full")
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)
    pgc = types.SimpleNamespace(cp=cp_group)
    sparse = SparseAttentionConfig(block_size=4, num_window_blocks=2, backend="torch")
    for kind in ("sparse", "full"):
        module = LongGenCoreAttention(
            tcfg(cp_group.size()), 1, AttnMaskType.causal, "self", pg_collection=pgc, kind=kind, sparse=sparse
        )
        x = torch.zeros(8, 1, 4, 16)
        try:
            module(x, x, x, torch.ones(1, 1, 8, 8, dtype=torch.bool))  # raises before any communication
            errors[f"{kind}_mask"] = None
        except ValueError as e:
            errors[f"{kind}_mask"] = str(e)
        errors[f"{kind}_form"] = module.form
    try:
        LongGenCoreAttention(
            tcfg(cp_group.size()),
            1,
            AttnMaskType.causal,
            "self",
            pg_collection=pgc,
            kind="sparse",
            sparse=SparseAttentionConfig(block_size=4, backend="triton"),
        )
        errors["triton_cp"] = None
    except ValueError as e:
        errors["triton_cp"] = str(e)
    return errors


def _worker(rank, world_size):
    import torch.distributed as dist

    out = {}
    for variant in VARIANTS:
        for tp, cp in ((1, 1), (1, 2), (2, 2)):
            out[(variant, tp, cp)] = _run(variant, tp, cp)
    out[("sink_window", "pp2_cp2")] = _run_pp("sink_window", out[("sink_window", 1, 1)]["state"])
    for key in list(out):
        out[key].pop("state", None)
    pairs = [dist.new_group(ranks=[0, 1]), dist.new_group(ranks=[2, 3])]
    out["errors"] = _group_errors(pairs[rank // 2], pairs[rank // 2])
    return out


@pytest.fixture(scope="module")
def model_results():
    return run_distributed(_worker, world_size=4, timeout_s=280)


def _expected_grad(name, ref, partition_dim, tp, tp_rank):
    """The TP rank's slice of a full (TP=1) gradient. SwiGLU's fused fc1 is [gate; up] and each TP rank
    holds [gate slice; up slice], so it is sliced per half."""
    if partition_dim < 0 or tp == 1:
        return ref
    if "linear_fc1" in name:
        return torch.cat([half.chunk(tp, dim=partition_dim)[tp_rank] for half in ref.chunk(2, dim=0)])
    return ref.chunk(tp, dim=partition_dim)[tp_rank]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2)])
def test_loss_and_grads_match_cp1(model_results, variant, tp, cp):
    for rank, res in enumerate(model_results):
        ref = res[(variant, 1, 1)]
        got = res[(variant, tp, cp)]
        assert abs(got["loss"] - ref["loss"]) < 1e-5, (rank, got["loss"], ref["loss"])
        assert set(got["grads"]) == set(ref["grads"])
        for name, (g, pdim) in got["grads"].items():
            g = torch.from_numpy(g)
            want = _expected_grad(name, torch.from_numpy(ref["grads"][name][0]), pdim, tp, got["tp_rank"])
            assert g.shape == want.shape, (name, g.shape, want.shape)
            diff = float((g - want).abs().max())
            scale = float(want.abs().max()) + 1e-12
            assert diff <= 1e-5 * max(scale, 1.0), (
                f"rank {rank} {variant} tp{tp} cp{cp} {name}: max diff {diff:.3g}"
            )
        assert got["kinds"] == ["full/ring/math", "sparse/exchange/torch"], got["kinds"]
        assert ref["kinds"] == ["full/local/sdpa", "sparse/local/torch"], ref["kinds"]


@pytest.mark.timeout(300)
def test_pipeline_and_cp_match_cp1(model_results):
    """PP=2 x CP=2: each stage's gradients equal the reference's for its layers; the loss on the last
    stage equals the reference loss."""
    stages = set()
    for rank, res in enumerate(model_results):
        ref = res[("sink_window", 1, 1)]
        got = res[("sink_window", "pp2_cp2")]
        stages.add(got["pp_rank"])
        if got["loss"] is not None:
            assert abs(got["loss"] - ref["loss"]) < 1e-5, (rank, got["loss"], ref["loss"])
        assert got["grads"], rank
        bad = {}
        for name, g in got["grads"].items():
            want = torch.from_numpy(ref["grads"][name][0])
            diff = float((torch.from_numpy(g) - want).abs().max())
            if diff > 1e-5 * max(float(want.abs().max()), 1.0):
                bad[name] = (diff, float(torch.from_numpy(g).norm() / want.norm()))
        assert not bad, f"rank {rank} pp2 cp2 (max diff, norm ratio): {bad}"
        assert got["kinds"] == ["full/ring/math", "sparse/exchange/torch"], got["kinds"]
    assert stages == {0, 1}


@pytest.mark.timeout(300)
def test_reference_grads_are_not_trivial(model_results):
    grads = model_results[0][("sink_window", 1, 1)]["grads"]
    qkv = [torch.from_numpy(g) for name, (g, _) in grads.items() if "linear_qkv" in name]
    assert qkv and all(float(g.abs().max()) > 1e-6 for g in qkv)


@pytest.mark.timeout(300)
def test_rope_uses_global_positions(model_results):
    from megatron_longgen.context_parallel.sharding import zigzag_positions

    for res in model_results:
        full = torch.from_numpy(res[("sink_window", 1, 1)]["rope"])
        local = torch.from_numpy(res[("sink_window", 1, 2)]["rope"])
        pos = zigzag_positions(cp_rank=res[("sink_window", 1, 2)]["cp_rank"], cp_size=2, seq_len=SEQ)
        assert local.shape[0] == SEQ // 2
        torch.testing.assert_close(local, full[pos], rtol=0, atol=0)


@pytest.mark.timeout(300)
def test_core_attention_group_errors(model_results):
    for res in model_results:
        e = res["errors"]
        assert "pg_collection.cp has 2 ranks but config.context_parallel_size is 4" in e["mismatch"], e
        assert "needs pg_collection.cp" in e["missing"], e
        for kind in ("sparse", "full"):  # the same answer as with CP = 1
            assert "causal by construction: pass attention_mask=None" in e[f"{kind}_mask"], e
        assert (e["sparse_form"], e["full_form"]) == ("exchange", "ring")
        assert "'triton' runs only with the whole sequence" in e["triton_cp"], e
