"""What ``ckpt export`` and ``ckpt consolidate`` share: the checkpoint they read (a run
directory falls back past a corrupt newest checkpoint, as a training resume does) and the
one rule for where they write.

The rule for OUT, for both commands: it may not be a symbolic link, nor lie inside the
checkpoint or run directory read (nor hold it); an existing OUT is replaced only with
``--force`` and only if it is recognisably an earlier output of the same command (export:
a directory holding ``model.safetensors`` and nothing but export files; consolidate: a
regular file written by ``torch.save``). Anything else is refused, and nothing is touched.

Exit status of every ``sharded-ams`` command: 0 done; 1 the command ran and failed (training
failed, ``ckpt inspect`` found the checkpoint invalid, an I/O error while writing); 2 refused
before doing anything (bad command line, config, input data, checkpoint or OUT): one line
on stderr naming the file and field; 141 (128 + SIGPIPE) the reader of its output left
(``| head``: ``launcher/cli.py``); 130 / 143 a training run stopped by Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

__all__ = ["Refused", "check_output", "is_export_dir", "is_torch_save_file", "newest_usable",
           "EXIT_FAILED", "EXIT_REFUSED"]

EXIT_FAILED = 1
EXIT_REFUSED = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Refused(ValueError):
    """The command refuses to run as asked (bad input or OUT); the message says why."""


def is_export_dir(path: Path, names: set[str], weights: str) -> bool:
    """A real directory holding ``weights`` and nothing but regular files named in ``names``."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        entries = list(os.scandir(path))
    except OSError:
        return False
    return (any(e.name == weights for e in entries)
            and all(e.name in names and e.is_file(follow_symlinks=False) for e in entries))


def is_torch_save_file(path: Path) -> bool:
    """A regular file that starts as ``torch.save``'s zip archives do."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def check_output(out: Path, sources: list[Path], *, force: bool, ours: Callable[[Path], bool],
                 what: str) -> None:
    """Apply the module's rule to ``out`` (``what``: "an earlier export" or the like)."""
    if out.is_symlink():
        raise Refused(f"OUT {out} is a symbolic link; refusing to write through it (give a real path)")
    real_out = Path(os.path.realpath(out))
    for src in sources:
        real_src = Path(os.path.realpath(src))
        if real_out == real_src or real_src in real_out.parents:
            raise Refused(f"OUT {out} is inside the checkpoint directory {src}; write it somewhere else")
        if real_out in real_src.parents:
            raise Refused(f"OUT {out} holds the checkpoint directory {src}; write it somewhere else")
    if not os.path.lexists(out):
        return
    if not ours(out):
        mode = os.lstat(out).st_mode
        kind = ("is a directory" if stat.S_ISDIR(mode) else "is a file" if stat.S_ISREG(mode)
                else "is a special file")
        raise Refused(f"OUT {out} exists and {kind}, not {what}; refusing to replace it (choose "
                      "another OUT)")
    if not force:
        raise Refused(f"OUT {out} exists ({what}); pass --force to replace it")


def _newer_step_dirs(run: Path, step: int) -> list[str]:
    try:
        names = [e.name for e in os.scandir(run) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return sorted((n for n in names if _STEP_DIR.match(n) and int(_STEP_DIR.match(n).group(1)) > step),
                  reverse=True)


def newest_usable(ckpt: Any, read: Callable[[Path], Any], log: Callable[[str], None]
                  ) -> tuple[Path, Any]:
    """``(checkpoint, read(checkpoint))``: ``ckpt`` itself if it is a checkpoint (holds a
    manifest), else the run directory's newest checkpoint that ``read`` accepts, falling back
    past corrupt newer ones as a training resume does and saying so through ``log``."""
    from sharded_ams.checkpoint import CheckpointError, find_latest_checkpoint, validate_checkpoint
    from sharded_ams.checkpoint.manager import checkpoint_dirs, read_step

    p = Path(ckpt)
    if not p.is_dir():
        raise Refused(f"CKPT {p} does not exist or is not a directory")
    if os.path.lexists(p / "manifest.json"):
        return p, read(p)
    latest = find_latest_checkpoint(p, checksums=False)
    if latest is None:
        raise Refused(f"{p} is neither a checkpoint (no manifest.json) nor a run directory "
                      "holding a committed one")
    latest = Path(latest)
    skipped = _newer_step_dirs(p, validate_checkpoint(latest, checksums=False).step)
    try:
        got = read(latest)
    except CheckpointError as exc:  # corrupt, or holding NaN (diverged): the next older one
        for older in checkpoint_dirs(p):
            if older == latest or read_step(older) is None \
                    or read_step(older) >= read_step(latest):
                continue
            try:
                got = read(older)
            except CheckpointError:
                continue
            log(f"note: the newest checkpoint {latest} is unusable ({str(exc).splitlines()[0]}); "
                f"using the newest usable one, {older}, as a training resume would")
            return older, got
        raise
    if skipped:
        log(f"note: {', '.join(skipped)} in {p} are not valid checkpoints; using {latest}, "
            "the newest valid one, as a training resume would")
    return latest, got


NONFINITE_HINT = " (on the command line: --allow-nonfinite)"


def add_allow_nonfinite(parser) -> None:
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="read a checkpoint holding NaN/inf (masters or moments) or a "
                             "negative exp_avg_sq, e.g. to look at a diverged run (refused "
                             "otherwise; a run directory's newest such checkpoint is skipped for "
                             "an older one, as a training resume does)")
