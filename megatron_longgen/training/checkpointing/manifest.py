"""Checkpoint manifests: every file of a training checkpoint with its size and checksum, written last.

    step_0000100/manifest.json
      {"format_version": 1, "total_bytes": 1234,
       "files": {"model/__0_0.distcp": {"size": 1000, "checksum": "xxh3_64:9f3c..."}, ...}}

Design choices:
- Written after every other file of the checkpoint is on disk and before the folder is renamed to
  `step_N` (`checkpointing.py`), so a published checkpoint always has one. Paths are relative.
- Hashed in parallel: each rank hashes the files it wrote (`__R_*.distcp` of the dist checkpoints,
  `rng/rank_R.pt`), while they are still in its page cache; rank 0 hashes the rest and writes the merged
  manifest. Verification spreads the files over the ranks of the group the same way (by size).
- Checksum: xxHash3-64 when `xxhash` is importable (~6 GB/s on one core), else zlib's CRC-32 (~1 GB/s;
  stdlib). Both catch truncation, zeroed pages and garbage; neither is meant to stop tampering. Each
  entry names its algorithm, so a reader without xxhash still checks sizes (and says it skipped the
  checksum) instead of failing.
- `verify_checkpoint` always checks presence and sizes (one `stat` per file) and that the JSON files
  parse; checksums (one read of every byte) unless `checksums=False`: the escape hatch for checkpoints
  too large to re-read at start-up. Checkpoints written before manifests existed get structural checks
  instead: required files, JSON, and every `.distcp` file long enough for the byte ranges its dist
  checkpoint `.metadata` records (a truncated file is caught without loading it).
- `find_resumable_checkpoint` walks the published checkpoints newest first and returns the first intact
  one with the reasons the newer ones were skipped; `select_resume_checkpoint` is the trainer's
  one-call version (warns per skipped checkpoint, refuses when none is intact).
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

from megatron_longgen.training.checkpointing.layout import (
    MANIFEST_FILE,
    OPTIM_SUBDIR,
    TRAINER_STATE_FILE,
    checkpoint_step,
    published_checkpoints,
    read_latest,
    write_text_atomic,
)
from megatron_longgen.utils.optional import has_xxhash

MANIFEST_VERSION = 1
CONFIG_FILE = (
    "longgen_config.json"  # checkpoint.format.CONFIG_FILE (not imported: keeps this module torch-free)
)
_CHUNK_BYTES = 16 * 2**20
_RANK_OWNED = (re.compile(r"(?:^|/)__(\d+)_\d+\.distcp$"), re.compile(r"^rng/rank_(\d+)\.pt$"))


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be resumed: `path` (the folder), `file` (relative, or "" for the folder)
    and `reason`. The message names all three."""

    def __init__(self, path: str | os.PathLike, file: str, reason: str):
        self.path, self.file, self.reason = Path(path), file, reason
        where = f"{self.path / file}" if file else f"{self.path}"
        super().__init__(f"checkpoint {self.path} is not usable: {where}: {reason}")

    @property
    def summary(self) -> str:
        """`file: reason` (or the reason alone), for lists of skipped checkpoints."""
        return f"{self.file}: {self.reason}" if self.file else self.reason


class NoIntactCheckpointError(CorruptCheckpointError):
    """Checkpoints exist but none of them is intact (`skipped` lists each with its reason)."""

    def __init__(self, checkpoints_dir: str | os.PathLike, skipped: list[tuple[Path, str]]):
        self.skipped = skipped
        listing = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
        super().__init__(
            checkpoints_dir,
            "",
            f"no intact checkpoint to resume from ({listing}). Restore a good copy, or start afresh with "
            "--overwrite (the old run is moved aside) or another --run-dir",
        )


# ------------------------------------------------------------------------------------------- hashing


def checksum_algorithm() -> str:
    return "xxh3_64" if has_xxhash() else "crc32"


def hash_file(path: str | os.PathLike, algorithm: str) -> str:
    """`algorithm:hexdigest` of the file's bytes (read in 16 MiB chunks into one reused buffer)."""
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    if algorithm == "xxh3_64":
        import xxhash

        hasher = xxhash.xxh3_64()
        with open(path, "rb", buffering=0) as fh:
            while count := fh.readinto(buffer):
                hasher.update(view[:count])
        return f"{algorithm}:{hasher.hexdigest()}"
    if algorithm == "crc32":
        crc = 0
        with open(path, "rb", buffering=0) as fh:
            while count := fh.readinto(buffer):
                crc = zlib.crc32(view[:count], crc)
        return f"{algorithm}:{crc:08x}"
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (known: xxh3_64, crc32)")


def _can_hash(algorithm: str) -> bool:
    return algorithm == "crc32" or (algorithm == "xxh3_64" and has_xxhash())


def file_owner(relpath: str, world_size: int) -> int:
    """The rank that wrote (and hashes) a file: R for `__R_*.distcp` and `rng/rank_R.pt`, else 0."""
    for pattern in _RANK_OWNED:
        match = pattern.search(relpath)
        if match and int(match.group(1)) < world_size:
            return int(match.group(1))
    return 0


def _list_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )


# ------------------------------------------------------------------------------------- collectives


def _rank_world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def all_gather(obj, group) -> list:
    """`obj` of every rank of `group` (a one-element list without a group)."""
    if group is None:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast(obj, group):
    """Rank 0's `obj` on every rank of `group` (`obj` itself without a group)."""
    if group is None:
        return obj
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
    return holder[0]


# ---------------------------------------------------------------------------------------- writing


def write_manifest(folder: str | os.PathLike, *, group=None) -> int:
    """Collective over `group` (None: this process alone): hash every file under `folder` (each rank its
    own) and write `folder/manifest.json` from rank 0. Returns the checkpoint's total bytes."""
    root = Path(folder)
    rank, world = _rank_world(group)
    algorithm = checksum_algorithm()
    # Rank 0 lists the folder once (not every rank: thousands of stat calls each on a parallel file system).
    listing = broadcast(_list_files(root) if rank == 0 else None, group)
    mine, error = {}, None
    try:
        for rel in listing:
            if file_owner(rel, world) == rank:
                mine[rel] = {
                    "size": (root / rel).stat().st_size,
                    "checksum": hash_file(root / rel, algorithm),
                }
    except OSError as err:  # reported on every rank below, so no rank is left waiting in a collective
        error = f"rank {rank} could not hash {err.filename}: {err.strerror or err}"
    gathered = all_gather((mine, error), group)
    errors = [e for _, e in gathered if e]
    if errors:
        raise OSError(f"writing the manifest of {root} failed: {errors[0]}")
    files = {rel: entry for part, _ in gathered for rel, entry in part.items()}
    if rank == 0:
        payload = {
            "format_version": MANIFEST_VERSION,
            "total_bytes": sum(e["size"] for e in files.values()),
            "files": dict(sorted(files.items())),
        }
        write_text_atomic(root / MANIFEST_FILE, json.dumps(payload, indent=1) + "\n")
    return sum(e["size"] for e in files.values())


def manifest_total_bytes(folder: str | os.PathLike) -> int | None:
    """`total_bytes` of a checkpoint's manifest, or None without a readable one."""
    try:
        return int(json.loads((Path(folder) / MANIFEST_FILE).read_text())["total_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------- verifying


def _read_json(folder: Path, rel: str):
    path = folder / rel
    if not path.is_file():
        raise CorruptCheckpointError(folder, rel, "is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(folder, rel, f"is not valid JSON ({err})") from err
    except OSError as err:
        raise CorruptCheckpointError(folder, rel, f"cannot be read ({err.strerror or err})") from err


def _check_json_files(folder: Path) -> dict:
    """Parse trainer_state.json and longgen_config.json (cheap; catches what a size-only check cannot)."""
    state = _read_json(folder, TRAINER_STATE_FILE)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpointError(folder, TRAINER_STATE_FILE, "has no integer 'step' field")
    config = _read_json(folder, CONFIG_FILE)
    if not isinstance(config, dict) or "config" not in config:
        raise CorruptCheckpointError(folder, CONFIG_FILE, "has no 'config' section")
    return state


def _check_entry(folder: Path, rel: str, entry: dict, *, checksums: bool) -> str | None:
    """Why one manifest entry does not match the file on disk, or None."""
    path = folder / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size != entry["size"]:
        return f"has {size} bytes, the manifest records {entry['size']} (truncated or overwritten)"
    if checksums:
        algorithm = entry["checksum"].split(":", 1)[0]
        if not _can_hash(algorithm):
            return None  # reported once by verify_checkpoint (size checked)
        try:
            actual = hash_file(path, algorithm)
        except OSError as err:
            return f"cannot be read ({err.strerror or err})"
        if actual != entry["checksum"]:
            return f"checksum {actual} does not match the manifest's {entry['checksum']} (corrupted)"
    return None


def _share(entries: dict[str, dict], rank: int, world: int) -> list[str]:
    """This rank's files: largest first onto the least-loaded rank (deterministic, balanced by bytes)."""
    load = [0] * world
    mine = []
    for rel, entry in sorted(entries.items(), key=lambda kv: (-kv[1]["size"], kv[0])):
        target = min(range(world), key=lambda r: (load[r], r))
        load[target] += entry["size"]
        if target == rank:
            mine.append(rel)
    return mine


def _legacy_checks(folder: Path, state: dict) -> None:
    """Structural checks of a checkpoint written before manifests: the dist checkpoints' files exist and
    are as long as their `.metadata` says."""
    subdirs = ["model"] + ([OPTIM_SUBDIR] if (folder / OPTIM_SUBDIR).is_dir() else [])
    for sub in subdirs:
        for name in ("metadata.json", ".metadata"):
            if not (folder / sub / name).is_file():
                raise CorruptCheckpointError(folder, f"{sub}/{name}", "is missing")
        try:
            from torch.distributed.checkpoint import FileSystemReader

            storage = FileSystemReader(str(folder / sub)).read_metadata().storage_data
        except Exception as err:  # an unpicklable .metadata can raise almost anything
            raise CorruptCheckpointError(folder, f"{sub}/.metadata", f"cannot be read ({err})") from err
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, end in sorted(needed.items()):
            path = folder / sub / name
            if not path.is_file():
                raise CorruptCheckpointError(folder, f"{sub}/{name}", "is missing")
            if path.stat().st_size < end:
                raise CorruptCheckpointError(
                    folder,
                    f"{sub}/{name}",
                    f"has {path.stat().st_size} bytes but {sub}/.metadata places data up to byte {end} (truncated)",
                )


def verify_checkpoint(path: str | os.PathLike, *, checksums: bool = True, group=None) -> None:
    """Collective over `group` (None: this process checks everything): raise CorruptCheckpointError
    naming the first bad file and why, or return when the checkpoint is intact.

    Sizes and JSON always; checksums unless `checksums=False`. Every rank gets the same answer.
    """
    folder = Path(path)
    rank, world = _rank_world(group)
    problems: list[tuple[str, str]] = []
    skipped_algorithms: set[str] = set()
    try:
        if not folder.is_dir():
            raise CorruptCheckpointError(folder, "", "does not exist")
        state = _check_json_files(folder)
        if (folder / MANIFEST_FILE).is_file() or state.get("manifest"):
            manifest = _read_json(folder, MANIFEST_FILE)
            entries = manifest.get("files") if isinstance(manifest, dict) else None
            if not isinstance(entries, dict) or not entries:
                raise CorruptCheckpointError(folder, MANIFEST_FILE, "lists no files")
            for rel in _share(entries, rank, world):
                reason = _check_entry(folder, rel, entries[rel], checksums=checksums)
                if reason:
                    problems.append((rel, reason))
                if checksums and not _can_hash(entries[rel]["checksum"].split(":", 1)[0]):
                    skipped_algorithms.add(entries[rel]["checksum"].split(":", 1)[0])
        elif rank == 0:
            _legacy_checks(folder, state)
    except CorruptCheckpointError as err:
        problems.append((err.file, err.reason))
    gathered = all_gather((problems, sorted(skipped_algorithms)), group)
    found = sorted({p for part, _ in gathered for p in part})
    if found:
        raise CorruptCheckpointError(folder, *found[0])
    missing = sorted({a for _, algos in gathered for a in algos})
    if missing and rank == 0:
        warnings.warn(
            f"{folder}: checksums not verified ({', '.join(missing)} needs `pip install xxhash`); sizes match",
            stacklevel=2,
        )


def find_resumable_checkpoint(
    checkpoints_dir: str | os.PathLike, *, checksums: bool = True, group=None
) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Collective over `group`: the newest intact published checkpoint (None if there is none) and the
    `(path, reason)` of every newer one skipped, plus a `latest` that names a missing folder.

    Published `step_N` folders are the commit points (renamed only when complete), so the newest intact
    one by step wins even when `latest` lags behind it (a crash between the rename and `latest`'s
    rewrite). The candidate list is rank 0's view, so every rank walks the same list.
    """
    root = Path(checkpoints_dir)
    view = (
        ([p.name for p in published_checkpoints(root)], read_latest(root))
        if _rank_world(group)[0] == 0
        else None
    )
    names, latest = broadcast(view, group)
    skipped: list[tuple[Path, str]] = []
    if latest is not None and latest not in names:
        reason = (
            "named by `latest`, but the folder does not exist"
            if checkpoint_step(latest) is not None
            else f"`latest` holds {latest!r}, not a checkpoint name"
        )
        skipped.append((root / latest, reason))
    for name in reversed(names):
        try:
            verify_checkpoint(root / name, checksums=checksums, group=group)
        except CorruptCheckpointError as err:
            skipped.append((root / name, err.summary))
            continue
        return root / name, skipped
    return None, skipped


def select_resume_checkpoint(
    checkpoints_dir: str | os.PathLike,
    *,
    checksums: bool = True,
    group=None,
    warn: Callable[[str], None] | None = None,
) -> Path | None:
    """Collective: the checkpoint to resume from, or None when the run has none (a fresh start).

    Each skipped checkpoint is reported through `warn` (default: `warnings.warn`) with its reason; when
    checkpoints exist (or `latest` names one) but none is intact, raises NoIntactCheckpointError listing
    them all.
    """
    path, skipped = find_resumable_checkpoint(checkpoints_dir, checksums=checksums, group=group)
    if path is None and skipped:
        raise NoIntactCheckpointError(checkpoints_dir, skipped)
    report = warn or (lambda text: warnings.warn(text, stacklevel=3))
    for bad, reason in skipped:
        report(f"skipping checkpoint {bad}: {reason}; resuming from {path}")
    return path
