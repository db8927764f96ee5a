"""The kinds of failure `mambamia train` and `mambamia export` report, each one line + its exit code.

    0   done
    1   unexpected error: a bug or a failing machine (the traceback is printed)
    2   usage or config: a bad command line, config file, override or value, or a config that
        differs from the run's checkpoint in a way a resume cannot honour
    3   data: a dataset folder (index.json, shards) missing or malformed, or too many bad records
    4   checkpoint: no usable checkpoint (damaged, incomplete or unsafe files)
    5   diverged: more non-finite steps than `max_nonfinite_steps` (train)
    85  checkpointed on SIGUSR1/SIGTERM: requeue the job (train; see trainer/signals.py)

A launcher can act on the kind: requeue on 85, retry on 1, stop and tell a person on 2-5.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

UNEXPECTED, CONFIG, DATA, CHECKPOINT, DIVERGED = 1, 2, 3, 4, 5


class DataError(RuntimeError):
    """A dataset the run reads is missing or malformed; the message names the folder or file."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. A message that holds a traceback (an exception re-raised
    from a DataLoader worker) ends with the original error's own line, so that one is kept."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[-1] if len(lines) > 1 and "Traceback" in str(err) else " ".join(lines)


def exit_code(err: BaseException) -> int | None:
    """The exit code of a documented error type, None for anything else."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError

    for kind, code in ((ConfigError, CONFIG), (DataError, DATA), (CheckpointError, CHECKPOINT)):
        if isinstance(err, kind):
            return code
    return None


def run_reporting(prog: str, body: Callable[[], int]) -> int:
    """`body()`, with the documented errors turned into `prog: message` on stderr and their code.

    Anything else propagates with its traceback (exit 1 through Python): an unexpected error is
    a bug whose stack a person needs.
    """
    try:
        return body()
    except Exception as err:
        code = exit_code(err)
        if code is None:
            raise
        print(f"{prog}: {one_line(err)}", file=sys.stderr, flush=True)
        return code
