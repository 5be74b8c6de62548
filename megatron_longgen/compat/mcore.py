"""Every difference between the Megatron-Core versions this project supports, in one place.

Supported and tested: 0.16.1 (the newest with Python 3.11 wheels: CPU CI) and 0.19.2 (Python >= 3.12:
what users' containers carry). Code elsewhere asks this module instead of comparing versions itself.
CPU-only patches of Megatron-Core live in `megatron_longgen/patches/` (with their own version gates).

What changed between them, and how each is handled:

- **`GPTModel` is deprecated in 0.19** ("GPTModel IS DEPRECATED ... use HybridModel") but still built and
  maintained for critical fixes. LongGen stays on it on purpose: `HybridModel` takes one `attention_layer`
  spec for every attention layer (LongGen mixes sparse and full core attention per layer) and splits each
  block into separate attention and MLP layers, which would renumber every parameter and break checkpoint
  compatibility between the two versions. `quiet_gpt_model_deprecation()` drops exactly that message
  while *our* builder constructs a GPTModel, and `note_gpt_model_choice()` says once, in our words, why.
- **MLP specs** (`mlp_submodule`): 0.19 wants a transformer layer's MLP given as a call of
  `MLP.as_mlp_submodule` and rewraps (with a warning) a `ModuleSpec(module=MLP)`; 0.16.1 only builds
  `ModuleSpec`s.
- **DDP + distributed optimizer** (`wrap_in_ddp`): 0.19 expects the caller to compute the parameter layout
  (`DistributedOptimizer.compute_full_param_layout`) and pass it to DDP, else it computes one itself with a
  warning; 0.16.1 has no such argument.
- **Background checkpoint saves** (`async_save_kwargs`): 0.19's `dist_checkpointing.save(...,
  async_sharded_save=True)` defaults to `async_strategy="nvrx"`, which needs `nvidia-resiliency-ext` and
  returns NVRx requests; the saver runs Megatron-Core's own requests and queue (`async_utils`), so it asks
  for `async_strategy="mcore"` (0.19 logs once that it is deprecated); 0.16.1 has only that one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
from collections.abc import Iterator

from packaging.version import Version

TESTED_MCORE = ("0.16.1", "0.19.2")
MCORE_VERSION = importlib.metadata.version("megatron-core")
_V = Version(MCORE_VERSION)

_log = logging.getLogger(__name__)
_GPT_DEPRECATION_LOGGER = "megatron.core.models.gpt.gpt_model"
_GPT_DEPRECATION_PREFIX = "GPTModel IS DEPRECATED"


def mcore_at_least(version: str) -> bool:
    return _V >= Version(version)


def async_save_kwargs() -> dict:
    """Extra keyword arguments of `dist_checkpointing.save(..., async_sharded_save=True)` so that it returns
    a Megatron-Core `AsyncRequest` (what `training/checkpointing/saver.py` schedules) on every version."""
    if not mcore_at_least("0.19"):
        return {}
    # The deprecation notice is about Megatron-Core's plans, not something a user of this trainer can act on.
    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.torch")
    if not any(isinstance(f, _DropMcoreAsyncDeprecation) for f in logger.filters):
        logger.addFilter(_DropMcoreAsyncDeprecation())
    return {"async_strategy": "mcore"}


class _DropMcoreAsyncDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MCore's async save is deprecated")


def mlp_submodule(*, linear_fc1, linear_fc2):
    """The `mlp` entry of a TransformerLayerSubmodules for Megatron's dense `MLP` with these linears."""
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    submodules = MLPSubmodules(linear_fc1=linear_fc1, linear_fc2=linear_fc2)
    if hasattr(MLP, "as_mlp_submodule"):  # 0.19+
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=MLP, submodules=submodules)


class _DropGPTModelDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_GPT_DEPRECATION_PREFIX)


@contextlib.contextmanager
def quiet_gpt_model_deprecation() -> Iterator[None]:
    """Drop Megatron 0.19's GPTModel deprecation warning (and only it) inside the block; see the module
    docstring for why LongGen builds GPTModel anyway. A no-op on versions without the warning."""
    if not mcore_at_least("0.19"):
        yield
        return
    logger = logging.getLogger(_GPT_DEPRECATION_LOGGER)
    drop = _DropGPTModelDeprecation()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@functools.cache
def note_gpt_model_choice() -> None:
    """Log once per process why LongGen builds the GPTModel that Megatron-Core 0.19 deprecates."""
    if mcore_at_least("0.19"):
        _log.info(
            "megatron-core %s deprecates GPTModel for HybridModel; LongGen keeps GPTModel: HybridModel "
            "has one attention spec for all attention layers (LongGen mixes sparse and full per layer) "
            "and renumbers parameters (checkpoints would differ between versions). "
            "See megatron_longgen/compat/mcore.py.",
            MCORE_VERSION,
        )


def wrap_in_ddp(chunks, *, config, ddp_config, pg_collection=None) -> list:
    """Wrap each model chunk in Megatron's DistributedDataParallel (bucketing only for the first chunk,
    as Megatron's interleaved schedule expects).

    With `ddp_config.use_distributed_optimizer` on 0.19+, the parameter layout the distributed optimizer
    shards by is computed here and passed in (DDP warns and computes the same layout itself otherwise):
    the bucket size DDP will use (None, i.e. one bucket, unless `overlap_grad_reduce`; always None for
    chunks after the first and on later pipeline stages) over the data-parallel x context-parallel group.
    `pg_collection` (Megatron's ProcessGroupCollection, with `dp`, `dp_cp` and `pp`) is passed to DDP when
    given; without it DDP uses Megatron's global parallel state.
    """
    from megatron.core.distributed import DistributedDataParallel

    wrapped = []
    for index, chunk in enumerate(chunks):
        kwargs = {} if pg_collection is None else {"pg_collection": pg_collection}
        disable_bucketing = index > 0
        if ddp_config.use_distributed_optimizer and mcore_at_least("0.19"):
            kwargs["full_param_layout"] = _full_param_layout(
                chunk, ddp_config=ddp_config, disable_bucketing=disable_bucketing, pg_collection=pg_collection
            )
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=disable_bucketing,
                **kwargs,
            )
        )
    return wrapped


def _full_param_layout(chunk, *, ddp_config, disable_bucketing: bool, pg_collection):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    groups = pg_collection if pg_collection is not None else ProcessGroupCollection.use_mpu_process_groups()
    # The same bucket size DistributedDataParallel.__init__ (0.19.2) settles on.
    bucket_size = ddp_config.bucket_size
    if bucket_size is None:
        bucket_size = max(40_000_000, 1_000_000 * groups.dp.size())
    if not ddp_config.overlap_grad_reduce or disable_bucketing or groups.pp.rank() > 0:
        bucket_size = None
    # The optimizer shards over the intra-instance group, the whole dp x cp group with one instance.
    shard_group = getattr(groups, "intra_dp_cp", None) or groups.dp_cp
    expert_group = getattr(groups, "intra_expt_dp", None) or getattr(groups, "expt_dp", None)
    params = [p for p in chunk.parameters() if p.requires_grad]
    return DistributedOptimizer.compute_full_param_layout(
        params,
        bucket_size,
        shard_group.size(),
        ddp_config,
        expert_data_parallel_world_size=expert_group.size() if expert_group is not None else None,
    )
