"""tools/preprocess_data.py as a user runs it: an existing dataset is not replaced without --force (like
the converters), bad inputs end with exit status 2 and one line, and the temporary files of a killed
earlier run into the same prefix are removed (a live run's are kept)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tools.conftest import dead_pid, run_tool

pytestmark = pytest.mark.slow  # trainer processes or several gloo ranks: outside the fast tier


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("One small story.\n\nAnother one, a little longer than the first.\n\nThe end.\n")
    return path


def _run(corpus: Path, prefix: Path, *extra: str):
    return run_tool(
        "preprocess_data.py",
        "--input",
        str(corpus),
        "--tokenizer",
        "builtin:tiny_sp",
        "--output-prefix",
        str(prefix),
        "--no-progress",
        *extra,
    )


def _error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("preprocess_data.py: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0][len("preprocess_data.py: error: ") :]


def test_existing_output_needs_force(corpus, tmp_path):
    prefix = tmp_path / "out"
    assert _run(corpus, prefix).returncode == 0
    before = {ext: (tmp_path / f"out{ext}").read_bytes() for ext in (".bin", ".idx", ".stats.json")}
    other = tmp_path / "other.txt"
    other.write_text("A different corpus entirely.\n")
    result = _run(other, prefix)
    assert result.returncode == 2
    assert (
        _error(result) == f"output {prefix}.bin and {prefix}.idx already exists; pass --force to replace it"
    )
    assert {ext: (tmp_path / f"out{ext}").read_bytes() for ext in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.txt",
        "other.txt",
        "out.bin",
        "out.idx",
        "out.stats.json",
    ]
    replaced = _run(other, prefix, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert (tmp_path / "out.bin").read_bytes() != before[".bin"]


def test_missing_input(tmp_path):
    result = run_tool(
        "preprocess_data.py",
        "--input",
        str(tmp_path / "none.jsonl"),
        "--tokenizer",
        "builtin:tiny_sp",
        "--output-prefix",
        str(tmp_path / "out"),
        "--no-progress",
    )
    assert result.returncode == 2
    assert _error(result) == f"input file {tmp_path / 'none.jsonl'} does not exist"
    assert list(tmp_path.iterdir()) == []


def test_zero_workers(corpus, tmp_path):
    result = _run(corpus, tmp_path / "out", "--workers", "0")
    assert result.returncode == 2
    assert _error(result) == "workers must be >= 1, got 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_killed_run_leftovers_are_removed_and_live_ones_kept(corpus, tmp_path):
    gone, alive = dead_pid(), os.getpid()
    stale = [
        f"out.tmp{gone}.bin",
        f"out.tmp{gone}.idx",
        f"out.raw{gone}.bin",
        f"out.raw{gone}.idx",
        f"out.raw{gone}.tmp{gone}.bin",
        f"out.stats.json.tmp{gone}",
    ]
    kept = [f"out.tmp{alive}.bin", "out.tmpnotapid.bin", "outer.tmp1.bin"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"\0" * 64)
    result = _run(corpus, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for name in stale:
        assert f"removed {tmp_path / name} (left by a killed run)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.txt", "out.bin", "out.idx", "out.stats.json", *kept]
    )
