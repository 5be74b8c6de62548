"""What a resumed run must share with the checkpoint it resumes, and what it may change when asked to.

A checkpoint records the run's config (`longgen_config.json`) and, in `trainer_state.json`, a signature of
the tokenizer and of the training data (content hashes, not paths: data moved to another mount is the same
data). `compare_for_resume` sorts every difference between the checkpoint's config and the new one:

- identity — the model (every `model.*` field), the sparse pattern (`sparse.*` except the kernel choice),
  the tokenizer, the data (`data.*` and the signatures), and what fixes the data order (`train.seq_length`,
  `train.global_batch_size`, `train.seed`) or the numerics (`train.dtype`): refused, fields listed;
- `schedule` — the step budget and the optimiser's schedule (`train.max_steps`, LR, warm-up, decay, weight
  decay, Adam, clipping): allowed with `--allow-change schedule`; the LR schedule is then rebuilt from the
  new config at the resumed step (without it, Megatron's scheduler would silently keep the old one);
- `layout` — the parallel layout (`parallel.*`, `train.pipeline_layout`): allowed with
  `--allow-change layout` where the checkpoint is reshardable (the loader checks the optimizer format);
- everything else (logging, intervals, kernels, recompute, NaN policy, ...): allowed, and printed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron_longgen.config import LongGenConfig, config_to_dict

CHANGE_KINDS = ("schedule", "layout")

_SCHEDULE_FIELDS = {
    "train.max_steps",
    "train.lr",
    "train.min_lr",
    "train.lr_warmup_steps",
    "train.lr_decay_style",
    "train.weight_decay",
    "train.adam_beta1",
    "train.adam_beta2",
    "train.adam_eps",
    "train.clip_grad",
}
_IDENTITY_TRAIN_FIELDS = {"train.seq_length", "train.global_batch_size", "train.seed", "train.dtype"}
_FREE_FIELDS = {"name", "sparse.backend", "data.cache_dir", "train.init_checkpoint"}


class ResumeMismatchError(ValueError):
    """The resumed run differs from its checkpoint in a way that is refused (the message lists how)."""


def _sha256(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_signature(tokenizer) -> dict:
    """Vocabulary size, special ids and a hash of the tokenizer's files."""
    path = Path(tokenizer.path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + _sha256(file).encode())
    return {
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "sha256": digest.hexdigest(),
    }


def data_signature(cfg: LongGenConfig) -> dict:
    """Hashes of what the training data is made of: each blend prefix's index (`.idx`: every document's
    length, cheap to hash) and size of its token file, or the text corpus."""
    from megatron_longgen.data.tokenizers import BUILTIN_CORPORA, resolve_builtin

    if cfg.data.blend.strip():
        from megatron_longgen.data.blend import parse_blend

        prefixes, weights = parse_blend(cfg.data.blend)
        parts = []
        for prefix in prefixes:
            idx, binary = Path(prefix + ".idx"), Path(prefix + ".bin")
            parts.append(
                {
                    "name": os.path.basename(prefix),
                    "idx_sha256": _sha256(idx) if idx.is_file() else None,
                    "bin_bytes": binary.stat().st_size if binary.is_file() else None,
                }
            )
        return {"blend": parts, "weights": weights, "valid_fraction": cfg.data.valid_fraction}
    corpus = Path(resolve_builtin(cfg.data.corpus, BUILTIN_CORPORA, "corpus"))
    return {
        "corpus": corpus.name,
        "sha256": _sha256(corpus) if corpus.is_file() else None,
        "valid_fraction": cfg.data.valid_fraction,
    }


def _flatten(cfg: LongGenConfig) -> dict[str, object]:
    flat: dict[str, object] = {}
    for section, value in config_to_dict(cfg).items():
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    return flat


def _kind(name: str) -> str:
    if name in _FREE_FIELDS:
        return "free"
    if name in _SCHEDULE_FIELDS:
        return "schedule"
    if name.startswith("parallel.") or name == "train.pipeline_layout":
        return "layout"
    if name.startswith(("model.", "sparse.", "data.")) or name in _IDENTITY_TRAIN_FIELDS:
        return "identity"
    return "free"


@dataclass
class ResumeDiff:
    """Differences between a checkpoint's run and the resumed one, by kind."""

    identity: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    layout: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)

    def describe(self, kind: str) -> str:
        return "; ".join(getattr(self, kind))


def compare_for_resume(
    saved: LongGenConfig,
    current: LongGenConfig,
    *,
    saved_signatures: dict | None,
    current_signatures: dict,
) -> ResumeDiff:
    """Every difference, each as `field: old -> new`, sorted into its kind (see the module docstring)."""
    diff = ResumeDiff()
    old, new = _flatten(saved), _flatten(current)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            getattr(diff, _kind(name)).append(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    for what in ("tokenizer", "data"):
        was = (saved_signatures or {}).get(what)
        now = current_signatures.get(what)
        if was is not None and was != now:
            changed = sorted(k for k in set(was) | set(now or {}) if was.get(k) != (now or {}).get(k))
            diff.identity.append(f"{what} content differs from the checkpoint's ({', '.join(changed)})")
    return diff


def enforce(diff: ResumeDiff, *, checkpoint: str | os.PathLike, allowed: tuple[str, ...]) -> list[str]:
    """Raise ResumeMismatchError for refused differences; return the lines to print for accepted ones."""
    unknown = sorted(set(allowed) - set(CHANGE_KINDS))
    if unknown:
        raise ResumeMismatchError(f"--allow-change takes {list(CHANGE_KINDS)}, got {unknown}")
    if diff.identity:
        raise ResumeMismatchError(
            f"--resume: {checkpoint} belongs to a different run ({diff.describe('identity')}); resume with "
            "the same model, sparse pattern, tokenizer, data, sequence length, batch and seed, or start a new "
            "run in another --run-dir (or use --init-checkpoint to start from its weights)"
        )
    notes = []
    for kind in CHANGE_KINDS:
        changes = getattr(diff, kind)
        if changes and kind not in allowed:
            raise ResumeMismatchError(
                f"--resume: the {kind} differs from {checkpoint} ({diff.describe(kind)}); pass "
                f"--allow-change {kind} to accept it"
            )
        if changes:
            notes.append(f"resume: accepted {kind} change: {diff.describe(kind)}")
    if diff.free:
        notes.append(f"resume: settings changed: {diff.describe('free')}")
    return notes
