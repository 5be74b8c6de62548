"""Validate a launch before it queues for hours: parallel degrees, batch sizes, pipeline stages, FLOPs.

    python tools/check_launch.py --recipe llama2_70b_128k --nodes 32 --gpus-per-node 8
    DRY_RUN=1 sbatch slurm/llama2_70b_128k.sh           # the Slurm scripts call this and stop

Runs in one CPU process without torch.distributed. Exits 2 with the offending numbers when the recipe does
not fit the allocation (world size vs tp*pp*cp, global batch vs micro batch * dp, heads vs tp, ...).
"""

from __future__ import annotations

import argparse
import sys

from megatron_longgen.config import apply_overrides
from megatron_longgen.recipes import RECIPES, get_recipe, with_full_attention


def check(recipe: str, *, world_size: int, overrides: list[str], full: bool = False) -> list[str]:
    """Lines describing the launch; raises ValueError when it cannot run on `world_size` ranks."""
    from megatron_longgen.models.builder import model_vocab_size
    from megatron_longgen.training.flops import training_flops_per_step
    from megatron_longgen.training.pipeline_layout import pipeline_stage_sizes

    cfg = apply_overrides(get_recipe(recipe), overrides)
    if full:
        cfg = with_full_attention(cfg)
    p, t, m = cfg.parallel, cfg.train, cfg.model
    dp = p.data_parallel(world_size)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(
            f"global_batch_size {t.global_batch_size} must be a multiple of micro_batch_size * dp = "
            f"{t.micro_batch_size} * {dp} on {world_size} GPUs"
        )
    stages = pipeline_stage_sizes(cfg) or [m.num_layers // p.pipeline_parallel] * p.pipeline_parallel
    lines = [
        f"recipe {cfg.name}: {m.num_layers} layers, pattern {m.layer_pattern}",
        f"world {world_size} = tp {p.tensor_parallel} x pp {p.pipeline_parallel} x cp {p.context_parallel} x dp {dp}",
        f"global batch {t.global_batch_size} x {t.seq_length} tokens = {t.global_batch_size * t.seq_length:,} tokens/step; "
        f"{t.global_batch_size // (t.micro_batch_size * dp)} micro-batches of {t.micro_batch_size} per DP rank",
        f"vocab {m.vocab_size} padded to {model_vocab_size(cfg)}",
    ]
    offset = 0
    for stage, size in enumerate(stages):
        lines.append(f"pipeline stage {stage}: layers {offset}-{offset + size - 1} '{m.layer_pattern[offset:offset + size]}'")
        offset += size
    executed = training_flops_per_step(cfg)
    dense = training_flops_per_step(cfg, dense_equivalent=True)
    lines.append(f"training FLOPs/step: {executed / 1e15:.1f} PFLOP executed, {dense / 1e15:.1f} PFLOP dense-equivalent "
                 f"({dense / executed:.2f}x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--attention", choices=("hybrid", "full"), default="hybrid")
    parser.add_argument("--override", nargs="*", default=[], metavar="SECTION.FIELD=VALUE")
    args = parser.parse_args(argv)
    try:
        lines = check(args.recipe, world_size=args.nodes * args.gpus_per_node, overrides=args.override,
                      full=args.attention == "full")
    except ValueError as exc:
        print(f"check_launch: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print("launch OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
