"""compat/mcore.py on the installed Megatron-Core (0.16.1 in CPU CI, 0.19.2 on Python 3.12), 2 gloo ranks.

- `wrap_in_ddp` + the distributed optimizer trains exactly like Megatron's own DDP wrapping (which on 0.19
  computes the parameter layout itself, with a warning), and without that warning;
- our builder's GPTModel: on 0.19 Megatron's deprecation message is replaced by our one note, and only
  inside our builder (a GPTModel built directly still warns); the MLP spec is not rewrapped.
"""

import logging

import pytest
import torch

from megatron_longgen.compat import mcore
from tests.helpers.distributed import run_distributed
from tests.training.tiny import tiny_config

SEQ, VOCAB = 32, 128


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _train(wrap: str, steps: int = 3) -> list[float]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_longgen.megatron_bridge import to_transformer_config
    from megatron_longgen.models.builder import build_model
    from megatron_longgen.utils.distributed import initialize_model_parallel, set_seed

    cfg = tiny_config("parallel.use_distributed_optimizer=true", f"train.seq_length={SEQ}", pattern="SF")
    initialize_model_parallel(cfg)
    set_seed(0)
    tcfg = to_transformer_config(cfg)
    chunk = build_model(cfg, transformer_config=tcfg)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    if wrap == "compat":
        model = mcore.wrap_in_ddp([chunk], config=tcfg, ddp_config=ddp_cfg)[0]
    else:
        model = DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=chunk)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True, clip_grad=1.0), [model]
    )
    rank = torch.distributed.get_rank()
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)  # each DP rank its own micro-batch
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        pos = torch.arange(SEQ)[None].expand(2, -1)
        model.zero_grad_buffer()
        opt.zero_grad()
        loss = model(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        model.finish_grad_sync()
        opt.step()
        losses.append(loss.item())
    return losses


def _worker(rank, world_size):
    records = _Records()
    for name in ("megatron", "megatron_longgen"):
        logging.getLogger(name).addHandler(records)
        logging.getLogger(name).setLevel(logging.INFO)
    out = {"compat": _train("compat")}
    compat_messages = list(records.messages)
    records.messages.clear()
    out["megatron"] = _train("megatron")
    out["megatron_messages"] = list(records.messages)
    out["compat_messages"] = compat_messages

    from megatron.core.models.gpt import GPTModel

    from megatron_longgen.megatron_bridge import to_transformer_config
    from megatron_longgen.models.layer_specs import build_block_spec

    records.messages.clear()
    cfg = tiny_config(pattern="SF")
    tcfg = to_transformer_config(cfg)
    GPTModel(
        config=tcfg,
        transformer_layer_spec=build_block_spec("SF", sparse=cfg.sparse, config=tcfg),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
    )
    out["direct_gpt_messages"] = list(records.messages)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=2, timeout_s=300)


def _has(messages, text):
    return any(text in m for m in messages)


def test_wrap_in_ddp_trains_like_megatrons_own_wrapping(results):
    for r in results:
        assert len(r["compat"]) == 3 and r["compat"][-1] < r["compat"][0]
        assert r["compat"] == r["megatron"]  # same layout, same sharding: bit-identical losses


def test_no_layout_warning_with_wrap_in_ddp(results):
    rank0 = results[0]
    assert not _has(rank0["compat_messages"], "full_param_layout not provided")
    # ...while Megatron's own path warns on 0.19 (the warning the helper exists for).
    assert _has(rank0["megatron_messages"], "full_param_layout not provided") == mcore.mcore_at_least("0.19")


def test_gpt_model_deprecation_is_replaced_by_one_note_only_in_our_builder(results):
    rank0 = results[0]
    ours = rank0["compat_messages"] + rank0["megatron_messages"]
    assert not _has(ours, "GPTModel IS DEPRECATED")
    assert not _has(ours, "Rewrapping ModuleSpec")
    on_019 = mcore.mcore_at_least("0.19")
    # note_gpt_model_choice is once per process: it was logged during the first build.
    assert sum("LongGen keeps GPTModel" in m for m in rank0["compat_messages"]) == int(on_019)
    assert _has(rank0["direct_gpt_messages"], "GPTModel IS DEPRECATED") == on_019


def test_installed_megatron_is_a_tested_version():
    assert mcore.MCORE_VERSION in mcore.TESTED_MCORE
