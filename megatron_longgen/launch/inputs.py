"""A production run's inputs: data blend, tokenizer, initial checkpoint. Where they come from and whether
they fit the model.

Production recipes (`llama2_*_128k*`) leave the three open (`recipes.FROM_COMMAND_LINE`, an empty string):
they come from `longgen-train` flags or, when no flag is given, from the environment (what the Slurm
scripts export):

    --data-blend "PREFIX ..." | "W PREFIX W PREFIX"    LONGGEN_DATA_BLEND       -> data.blend
    --tokenizer PATH (SentencePiece .model / HF folder) LONGGEN_TOKENIZER        -> data.tokenizer
    --init-checkpoint DIR (tools/convert_hf_to_mcore.py) LONGGEN_INIT_CHECKPOINT  -> train.init_checkpoint
                                                          (`none`: random weights, on purpose)

A flag always wins; an environment variable only fills what the recipe leaves open, so a `LONGGEN_*` set
in a shell never changes the tiny recipe (which keeps its shipped corpus and tokenizer).

Checks (file reads stay cheap: a tokenizer load, `.idx` headers and length arrays, one JSON file):
- the tokenizer's vocabulary equals `model.vocab_size` and the initial checkpoint's, exactly;
- every blend prefix exists and is intact (`data/indexed.py`), its train split holds one sample, and the
  run's `max_steps * global_batch_size * seq_length` tokens do not repeat it more than a stated number of
  epochs;
- the initial checkpoint is a LongGen checkpoint whose model shape is the run's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from megatron_longgen.config import LongGenConfig

FROM_COMMAND_LINE = ""
"""The value a recipe gives an input it leaves to the command line / environment."""

ENV_DATA_BLEND = "LONGGEN_DATA_BLEND"
ENV_TOKENIZER = "LONGGEN_TOKENIZER"
ENV_INIT_CHECKPOINT = "LONGGEN_INIT_CHECKPOINT"

_HOW = {
    "data": f"pass --data-blend 'PREFIX ...' (tools/preprocess_data.py output) or set {ENV_DATA_BLEND}",
    "tokenizer": f"pass --tokenizer PATH (SentencePiece .model or HF tokenizer folder) or set {ENV_TOKENIZER}",
    "init_checkpoint": (
        f"pass --init-checkpoint DIR (tools/convert_hf_to_mcore.py output) or set {ENV_INIT_CHECKPOINT}"
    ),
}


def resolve_inputs(
    cfg: LongGenConfig,
    *,
    data_blend: str | None = None,
    tokenizer: str | None = None,
    init_checkpoint: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> LongGenConfig:
    """`cfg` with the flags applied and, for inputs the recipe leaves open, the environment variables."""
    env = os.environ if environ is None else environ
    data, train = cfg.data, cfg.train
    no_data = not data.blend.strip() and not data.corpus.strip()
    blend = data_blend if data_blend is not None else (env.get(ENV_DATA_BLEND, "") if no_data else None)
    if blend:
        data = dataclasses.replace(data, blend=blend)
    tok = (
        tokenizer
        if tokenizer is not None
        else (env.get(ENV_TOKENIZER) if data.tokenizer == FROM_COMMAND_LINE else None)
    )
    if tok:
        data = dataclasses.replace(data, tokenizer=tok)
    init = (
        init_checkpoint
        if init_checkpoint is not None
        else (env.get(ENV_INIT_CHECKPOINT) if train.init_checkpoint == FROM_COMMAND_LINE else None)
    )
    if init:
        # `none` asks for random initialisation explicitly (training from scratch).
        train = dataclasses.replace(train, init_checkpoint=None if init.lower() in ("none", "null") else init)
    return dataclasses.replace(cfg, data=data, train=train)


def missing_inputs(cfg: LongGenConfig) -> list[str]:
    """One message per input the config still leaves open, naming the flag and the variable."""
    missing = []
    if not cfg.data.blend.strip() and not cfg.data.corpus.strip():
        missing.append(f"{cfg.name} needs training data: {_HOW['data']}")
    if not cfg.data.tokenizer.strip():
        missing.append(f"{cfg.name} needs a tokenizer: {_HOW['tokenizer']}")
    if cfg.train.init_checkpoint == FROM_COMMAND_LINE:
        missing.append(f"{cfg.name} needs an initial checkpoint: {_HOW['init_checkpoint']}")
    return missing


# ----------------------------------------------------------------------------------------- tokenizer
def check_tokenizer(cfg: LongGenConfig) -> tuple[int, list[str]]:
    """(vocabulary size, problems) of the run's tokenizer against `model.vocab_size`."""
    from megatron_longgen.data.tokenizers import load_tokenizer

    try:
        tok = load_tokenizer(cfg.data.tokenizer)
    except (ValueError, OSError, ImportError) as exc:
        return 0, [f"tokenizer {cfg.data.tokenizer!r} cannot be loaded: {exc}"]
    if tok.vocab_size != cfg.model.vocab_size:
        return tok.vocab_size, [
            (
                f"tokenizer {cfg.data.tokenizer} has {tok.vocab_size} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}: they must be equal (use the tokenizer the checkpoint was trained with, "
                f"or --override model.vocab_size={tok.vocab_size} for a model trained from scratch)"
            )
        ]
    return tok.vocab_size, []


# ----------------------------------------------------------------------------------------- checkpoint
_SHAPE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_heads",
    "ffn_hidden_size",
    "vocab_size",
    "tie_embeddings",
)


def check_init_checkpoint(cfg: LongGenConfig) -> list[str]:
    """Problems of `train.init_checkpoint` (not a LongGen checkpoint, or another model's shape)."""
    from megatron_longgen.checkpoint.format import is_checkpoint, load_config

    path = cfg.train.init_checkpoint
    if not path:
        return []
    if not os.path.isdir(path):
        return [f"init checkpoint {path} does not exist ({_HOW['init_checkpoint']})"]
    if not is_checkpoint(path):
        return [
            (
                f"init checkpoint {path} is not a LongGen checkpoint (needs longgen_config.json and "
                f"model/metadata.json: convert one with tools/convert_hf_to_mcore.py)"
            )
        ]
    try:
        src = load_config(path).model
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return [f"init checkpoint {path}: {exc}"]
    diffs = [
        f"{name} {getattr(src, name)} (run: {getattr(cfg.model, name)})"
        for name in _SHAPE_FIELDS
        if getattr(src, name) != getattr(cfg.model, name)
    ]
    if diffs:
        return [f"init checkpoint {path} holds another model: " + ", ".join(diffs)]
    return []


# ----------------------------------------------------------------------------------------- data blend
@dataclass(frozen=True)
class PrefixStats:
    prefix: str
    weight: float
    """Normalised share of the training samples drawn from this prefix."""
    num_tokens: int
    train_tokens: int
    samples_per_epoch: int
    epochs: float
    """How often the run goes through this prefix's train split."""


def blend_stats(cfg: LongGenConfig) -> tuple[list[PrefixStats], list[str]]:
    """Per prefix of `data.blend`: tokens, train split, samples and epochs the run needs; plus problems
    (missing/corrupt files, a train split shorter than one sample, another tokenizer in PREFIX.stats.json)."""
    import numpy as np

    from megatron_longgen.data.blend import parse_blend
    from megatron_longgen.data.indexed import read_document_lengths, validate_indexed_prefix

    t = cfg.train
    prefixes, weights = parse_blend(cfg.data.blend)
    problems: list[str] = []
    infos = []
    for prefix in prefixes:
        try:
            infos.append((validate_indexed_prefix(prefix), read_document_lengths(prefix)))
        except (ValueError, OSError) as exc:
            problems.append(f"data blend: {exc}")
    if problems:
        return [], problems
    if weights is None:
        weights = [float(info.num_tokens) for info, _ in infos]
    total_weight = sum(weights)
    needed = t.max_steps * t.global_batch_size
    stats = []
    for (info, lengths), weight in zip(infos, weights):
        # Megatron's document split: train = documents [0, round((1 - valid_fraction) * n)).
        end = round((1.0 - cfg.data.valid_fraction) * lengths.size)
        train_tokens = int(np.asarray(lengths[:end], dtype=np.int64).sum())
        samples = max(train_tokens - 1, 0) // t.seq_length
        share = weight / total_weight
        epochs = share * needed / samples if samples else float("inf")
        stats.append(
            PrefixStats(
                prefix=info.prefix,
                weight=share,
                num_tokens=info.num_tokens,
                train_tokens=train_tokens,
                samples_per_epoch=samples,
                epochs=epochs,
            )
        )
        if samples == 0:
            problems.append(
                f"data blend: {info.prefix} has {train_tokens:,} training tokens (of {info.num_tokens:,}; "
                f"valid_fraction {cfg.data.valid_fraction}), fewer than one sequence of seq_length "
                f"{t.seq_length} + 1: use more data or a shorter seq_length"
            )
    return stats, problems


def check_blend_tokenizer(cfg: LongGenConfig, *, vocab_size: int) -> list[str]:
    """Problems when a prefix's `PREFIX.stats.json` (written by tools/preprocess_data.py) records another
    tokenizer vocabulary than the run's."""
    import json

    from megatron_longgen.data.blend import parse_blend

    problems = []
    for prefix in parse_blend(cfg.data.blend)[0]:
        path = prefix + ".stats.json"
        if not os.path.isfile(path):
            continue
        try:
            recorded = json.loads(Path(path).read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError) as exc:
            problems.append(f"data blend: {path} is unreadable: {exc}")
            continue
        if recorded is not None and recorded != vocab_size:
            problems.append(
                f"data blend: {prefix} was tokenized with a {recorded}-token vocabulary, the run's "
                f"tokenizer has {vocab_size}: re-run tools/preprocess_data.py with --tokenizer "
                f"{cfg.data.tokenizer}"
            )
    return problems
