"""Command-line entry points: user errors end in one line and a non-zero exit; bugs keep their traceback.

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(...)
        add_debug_flag(parser)
        args = parser.parse_args(argv)
        ...

    if __name__ == "__main__":
        sys.exit(run_cli(main, prog="convert_hf_to_mcore"))

What `run_cli` prints as `PROG: error: MESSAGE` (one line, no traceback) and the exit status:

| exception                                                       | meaning                      | exit |
|-----------------------------------------------------------------|------------------------------|------|
| `UserError`, `ValueError` (STYLE §18: ValueError is for users)  | the input is wrong           | 2    |
| `FileNotFoundError`, `FileExistsError`, `NotADirectoryError`,   | a path given is wrong        | 2    |
| `IsADirectoryError`, `ImportError` (optional dep, with its hint)|                              |      |
| any other `OSError` (full disk, permission, quota)              | the environment failed       | 1    |
| `KeyboardInterrupt`                                             | interrupted                  | 130  |
| anything else                                                   | a bug: traceback as usual    | 1    |

2 is also what argparse uses for a bad command line, so "fix your command" is always 2. `--debug` on the
command line (declare it with `add_debug_flag`) or `LONGGEN_DEBUG=1` in the environment re-raises user
errors with their traceback (and Megatron-Core's import-time "Transformer Engine and Apex are not installed"
notices, otherwise hidden). Under torchrun/srun each failing rank prints its own line, prefixed with its
rank when the world has more than one.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

DEBUG_ENV = "LONGGEN_DEBUG"
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_INTERRUPTED = 130
_BAD_PATH = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class UserError(Exception):
    """Something the user can fix (a value, a path, a missing flag); the message says what and how."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help=f"show tracebacks for user errors too (or set {DEBUG_ENV}=1)"
    )


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """`--override SECTION.FIELD=VALUE ...`: several pairs per flag, and the flag may repeat (the same
    syntax for every tool and the trainer)."""
    parser.add_argument(
        "--override",
        action="extend",
        nargs="+",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="set config fields, e.g. --override sparse.block_size=64 train.seq_length=131072",
    )


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def describe(err: BaseException) -> str:
    """The one-line message for a user error (OSErrors as `reason: path`, not `[Errno 2] ...`)."""
    if isinstance(err, OSError) and type(err).__str__ is OSError.__str__ and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror}{where}"
    lines = str(err).strip().splitlines()
    return " ".join(line.strip() for line in lines) if lines else type(err).__name__


def exit_status(err: BaseException) -> int | None:
    """The exit status for a user or environment error, None for a bug."""
    if isinstance(err, (UserError, ValueError, ImportError, *_BAD_PATH)):
        return EXIT_USER_ERROR
    if isinstance(err, OSError):
        return EXIT_RUN_FAILED
    return None


def _rank_tag() -> str:
    world = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    return f" [rank {rank}]" if world and rank and world != "1" else ""


def run_cli(main: Callable[[list[str]], int | None], *, prog: str, argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` (default: sys.argv[1:]) and turn user errors into `PROG: error: ...` + a status.
    Returns the exit status (main's return value, 0 for None)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not debug_requested(args):
        # Megatron-Core announces at import, in every process, that optional fused kernels are missing: on a
        # CPU box that is expected, and eight lines of it would bury the one line that matters.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        status = main(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as err:
        status = exit_status(err)
        if status is None or debug_requested(args):
            raise
        print(f"{prog}: error{_rank_tag()}: {describe(err)}", file=sys.stderr, flush=True)
        return status
    return 0 if status is None else int(status)
