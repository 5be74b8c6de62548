"""Outputs that appear whole or not at all, and the clean-up of what killed runs left behind.

A tool builds its output under a temporary name next to the final one and renames it when complete
(`atomic_output_dir`). A run killed with SIGKILL (or by a full node) cannot remove its temporary, so the
names say who owns them and the next run removes the ones whose owner is gone:

    OUT.tmp-<host>-<pid>-<random>/       converter folders (this module)
    PREFIX.tmp<pid>.bin/.idx, PREFIX.raw<pid>[.tmp<pid>].bin/.idx, PREFIX.stats.json.tmp<pid>
                                         preprocessing files (`data/indexed.py`, `data/preprocess.py`)

A temporary is stale when its process no longer runs on this host: `os.kill(pid, 0)` fails (a zombie
counts as gone). A live pid keeps it (a concurrent run, or a reused pid: left alone, never deleted by
mistake). Converter temporaries of another host are left alone; preprocessing names carry no host, so a
run on another host sharing the file system is judged by this host's pids (do not preprocess into the
same prefix from two hosts at once).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def host_tag() -> str:
    """This host's name, made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie does not count)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_dirs(out: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Remove `OUT.tmp-<this host>-<pid>-*` folders whose pid is gone. Returns (removed, kept): kept are
    temporaries of a live process, of another host, or without an owner in their name (older runs)."""
    final = Path(out).absolute()
    pattern = re.compile(rf"^{re.escape(final.name)}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
    removed, kept = [], []
    if not final.parent.is_dir():
        return removed, kept
    for path in sorted(final.parent.glob(f"{glob_escape(final.name)}.tmp-*")):
        match = pattern.match(path.name)
        if match and match["host"] == host_tag() and not pid_alive(int(match["pid"])):
            _remove(path)
            removed.append(path)
        else:
            kept.append(path)
    return removed, kept


def remove_stale_dataset_temps(prefix: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of killed `preprocess_data.py` runs into `prefix` (pid gone)."""
    final = Path(prefix).absolute()
    base = re.escape(final.name)
    patterns = (
        re.compile(rf"^{base}\.tmp(?P<pid>\d+)\.(bin|idx)$"),
        re.compile(rf"^{base}\.raw(?P<pid>\d+)(\.tmp\d+)?\.(bin|idx)$"),
        re.compile(rf"^{base}\.stats\.json\.tmp(?P<pid>\d+)$"),
    )
    removed = []
    if not final.parent.is_dir():
        return removed
    for path in sorted(final.parent.glob(f"{glob_escape(final.name)}.*")):
        for pattern in patterns:
            match = pattern.match(path.name)
            if match and not pid_alive(int(match["pid"])):
                _remove(path)
                removed.append(path)
                break
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder `OUT.tmp-<host>-<pid>-*` next to `out_dir`; on success it replaces
    `out_dir`, on error it is deleted (no partial output). An existing `out_dir` raises FileExistsError
    unless `force`. Temporaries of killed earlier runs are removed first (`remove_stale_dirs`)."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"output {out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{host_tag()}-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; the final folder gets the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
