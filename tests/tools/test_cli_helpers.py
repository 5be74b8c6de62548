"""utils/cli.py and utils/atomic_output.py in-process: which exceptions are user errors and with which
exit status, the one-line rendering, --debug, and the owner checks behind the temp-file clean-up."""

from __future__ import annotations

import argparse
import errno
import os

import pytest

from megatron_longgen.utils.atomic_output import (
    atomic_output_dir,
    host_tag,
    pid_alive,
    remove_stale_dirs,
)
from megatron_longgen.utils.cli import UserError, add_debug_flag, add_override_argument, run_cli
from tests.tools.conftest import dead_pid


def _raiser(exc):
    def main(argv):
        raise exc

    return main


@pytest.mark.parametrize(
    ("exc", "status", "line"),
    [
        (UserError("--tp must be >= 1, got 0"), 2, "tool: error: --tp must be >= 1, got 0"),
        (
            ValueError("seq_length 7 must be a multiple of 16"),
            2,
            "tool: error: seq_length 7 must be a multiple of 16",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"),
            2,
            "tool: error: No such file or directory: /x/y",
        ),
        (
            ImportError("needs 'transformers': pip install 'megatron_longgen[hf]'"),
            2,
            "tool: error: needs 'transformers': pip install 'megatron_longgen[hf]'",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/ckpt"),
            1,
            "tool: error: No space left on device: /ckpt",
        ),
        (ValueError("two\nlines"), 2, "tool: error: two lines"),
    ],
)
def test_user_errors_are_one_line(capsys, monkeypatch, exc, status, line):
    monkeypatch.delenv("LONGGEN_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli(_raiser(exc), prog="tool", argv=[]) == status
    assert capsys.readouterr().err == line + "\n"


def test_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.delenv("LONGGEN_DEBUG", raising=False)
    with pytest.raises(KeyError):
        run_cli(_raiser(KeyError("bug")), prog="tool", argv=[])


def test_debug_reraises_user_errors(monkeypatch):
    monkeypatch.delenv("LONGGEN_DEBUG", raising=False)
    with pytest.raises(UserError):
        run_cli(_raiser(UserError("x")), prog="tool", argv=["--debug"])
    monkeypatch.setenv("LONGGEN_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli(_raiser(UserError("x")), prog="tool", argv=[])


def test_interrupt_and_status(capsys, monkeypatch):
    assert run_cli(_raiser(KeyboardInterrupt()), prog="tool", argv=[]) == 130
    assert capsys.readouterr().err == "tool: interrupted\n"
    assert run_cli(lambda argv: None, prog="tool", argv=[]) == 0
    assert run_cli(lambda argv: 3, prog="tool", argv=[]) == 3


def test_rank_prefix_under_a_launcher(capsys, monkeypatch):
    monkeypatch.delenv("LONGGEN_DEBUG", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    run_cli(_raiser(ValueError("bad")), prog="tool", argv=[])
    assert capsys.readouterr().err == "tool: error [rank 3]: bad\n"


def test_override_argument_forms():
    parser = argparse.ArgumentParser()
    add_override_argument(parser)
    add_debug_flag(parser)
    args = parser.parse_args(["--override", "a.b=1", "c.d=2", "--override", "e.f=3", "--debug"])
    assert args.override == ["a.b=1", "c.d=2", "e.f=3"] and args.debug
    assert parser.parse_args([]).override == []


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())
    assert not pid_alive(0)


def test_atomic_output_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(out, force=False) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed halfway")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out, force=False) as tmp:
        assert tmp.name.startswith(f"out.tmp-{host_tag()}-{os.getpid()}-")
        (tmp / "done").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "done").is_file()
    with (
        pytest.raises(FileExistsError, match="already exists; pass --force"),
        atomic_output_dir(out, force=False),
    ):
        pass


def test_stale_dirs_without_an_owner_are_kept(tmp_path):
    legacy = tmp_path / "out.tmp-k2j3h4g5"  # the pre-owner naming: cannot tell whether it is in use
    legacy.mkdir()
    stale = tmp_path / f"out.tmp-{host_tag()}-{dead_pid()}-zzzz"
    stale.mkdir()
    removed, kept = remove_stale_dirs(tmp_path / "out")
    assert removed == [stale] and kept == [legacy]
