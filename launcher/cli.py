"""``sharded-ams``: the command line.

    sharded-ams train CONFIG [--address auto] [--num-workers N|MIN-MAX] [--gpus]
                             [--storage-path P] [--name NAME] [--steps N]
                             [--max-failures N] [--fail-at-step K --fail-rank R]
                             [--resume-from CKPT] [--set section.key=value ...]
                             [--dry-run] [--verbose]
    sharded-ams prepare-data INPUT... --out DIR [--tokenizer byte|bpe:VOCAB|tokenizer.json]
                             [--workers N] [--address auto] [--block-bytes 64M]
    sharded-ams ckpt ...      # inspect / consolidate / export checkpoints
    sharded-ams plan [MODEL | --model MODEL] --gpus 64 [--gpu h100-80gb] [--json] ...

``train`` runs the job locally on an embedded Ray (no ``--address``) or on a Ray cluster
(``--address auto`` on a cluster node, ``--address ray://head:10001`` from outside, or
``RAY_ADDRESS`` as set by ``ray job submit``). Running the same command again resumes the
run ``storage_path/name`` from its last checkpoint. Named flags override ``--set``, which
overrides the environment (``SHARDED_AMS_FAIL_AT_STEP``, ``SHARDED_AMS_FAIL_RANK``), which
overrides the config file. Before Ray starts, ``train`` checks what it can on this machine
(:mod:`launcher.run.preflight`, and the checkpoint it will resume from): a missing or damaged
prepare-data directory, a factory that does not import, a vocabulary that does not fit, an
unwritable ``--storage-path``, a ``--resume-from`` that is not a checkpoint, a global batch
that some worker count of ``--num-workers MIN-MAX`` cannot split fail here, with one line
and exit status 2. More workers than this machine's cores (embedded Ray) is a warning.

Exit status, the same for every command (``train``, ``prepare-data``, ``ckpt ...``): 0 done;
1 the command ran and failed (training failed: the message says where a rerun resumes;
``ckpt inspect`` found the checkpoint invalid; an I/O error while writing); 2 refused before
doing anything (a bad command line, config, input data, checkpoint or output path), with
one line on stderr naming the file and field.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Optional, Sequence


def _add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="run (or resume) a training job with Ray Train",
        description="Run a training job described by a TOML/YAML config with Ray Train, "
                    "locally or on a Ray cluster. Rerunning the same command resumes the run "
                    "from its last checkpoint (also after raising --steps).",
    )
    p.add_argument("config", help="job config (.toml, .yaml), e.g. launcher/configs/gpt_tiny.toml")
    p.add_argument("--address", default=None,
                   help="Ray cluster to use: 'auto' (on a cluster node), 'HOST:6379' or "
                        "'ray://HOST:10001'; default: $RAY_ADDRESS, else an embedded local Ray")
    p.add_argument("--num-workers", metavar="N|MIN-MAX",
                   help="training workers (job.num_workers): N, or an elastic range MIN-MAX that "
                        "shrinks when nodes are lost and grows when they return")
    p.add_argument("--gpus", action="store_true", default=None,
                   help="one GPU per worker and NCCL (job.use_gpu=true)")
    p.add_argument("--storage-path", metavar="P",
                   help="runs directory: local, NFS, or s3://... (job.storage_path)")
    p.add_argument("--name", help="run name; the run lives in storage_path/name (job.name)")
    p.add_argument("--steps", type=int, metavar="N", help="total optimizer steps (job.steps)")
    p.add_argument("--max-failures", type=int, metavar="N",
                   help="worker-group restarts allowed, -1 unlimited (job.max_failures)")
    p.add_argument("--fail-at-step", type=int, metavar="K",
                   help="fault injection: a worker exits after step K, once (job.fail_at_step)")
    p.add_argument("--fail-rank", type=int, metavar="R",
                   help="fault injection: the rank that exits (job.fail_rank, default 0)")
    p.add_argument("--resume-from", metavar="CKPT",
                   help="checkpoint to start from if the run has none of its own (job.resume_from)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-3 --set data.batch_size=32")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, data and model, print the resolved config as JSON "
                        "(stdout) and the batch split (stderr), and exit without starting Ray")
    p.add_argument("--verbose", "-v", action="store_true", help="show all of Ray's log lines")
    p.set_defaults(func=_cmd_train)


_FLAG_KEYS = {
    "num_workers": "job.num_workers",
    "gpus": "job.use_gpu",
    "storage_path": "job.storage_path",
    "name": "job.name",
    "steps": "job.steps",
    "max_failures": "job.max_failures",
    "fail_at_step": "job.fail_at_step",
    "fail_rank": "job.fail_rank",
    "resume_from": "job.resume_from",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from launcher.config import load_config, parse_override

    if os.getcwd() not in sys.path:  # factories in the current directory import, as with `python -m`
        sys.path.insert(0, os.getcwd())
    try:
        overrides = dict(parse_override(item) for item in args.overrides)
        for attr, key in _FLAG_KEYS.items():
            value = getattr(args, attr)
            if value is not None:
                overrides[key] = value
        config = load_config(args.config, overrides)
        from launcher.run.preflight import preflight

        local = args.address is None and not os.environ.get("RAY_ADDRESS")
        checked = preflight(config, local=local)
    except (ValueError, FileNotFoundError) as exc:
        return _usage_error(exc)
    from launcher.run.driver import LaunchError, run_lock

    job = checked.config.job
    try:  # a second launch of a running job is refused; a dry run only reads
        with contextlib.nullcontext() if args.dry_run else run_lock(job.run_dir, job.name):
            return _train(args, checked)
    except LaunchError as exc:
        return _usage_error(exc)


def _train(args: argparse.Namespace, checked) -> int:
    from launcher.run.driver import LaunchError, TrainingFailed, check_resume, run

    try:
        point = check_resume(checked.config)  # where a rerun resumes from: usable, same model
    except (ValueError, FileNotFoundError) as exc:
        return _usage_error(exc)
    for msg in checked.warnings:
        print(f"[sharded-ams] {msg}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(json.dumps(checked.config.to_dict(), indent=2))
        print(f"[sharded-ams] {batch_split(checked.config)}", file=sys.stderr, flush=True)
        return 0
    try:
        run(checked.config, address=args.address, verbose=args.verbose, checked=True,
            resume=point)
    except LaunchError as exc:  # found on the driver before training started
        return _usage_error(exc)
    except TrainingFailed as exc:
        print(f"[sharded-ams] TRAINING FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as exc:  # RunInterrupted once training started: it says where
        where = str(exc) or "rerun the same command to resume from the last checkpoint"
        signum = getattr(exc, "signum", signal.SIGINT)
        what = "INTERRUPTED" if signum == signal.SIGINT else f"STOPPED by {signal.Signals(signum).name}"
        print(f"[sharded-ams] {what}: {where}", file=sys.stderr, flush=True)
        return 128 + signum  # the shell's status for a process ended by that signal
    return 0


def batch_split(config) -> str:
    """How each optimizer step's global batch splits, at every worker count the job allows
    (one line; on stderr in --dry-run, so that stdout stays the JSON config). With
    ``parallel.tp > 1`` the ``tp`` ranks of a replica share its rows: the batch splits over
    the ``workers / tp`` data-parallel replicas, as the workers split it."""
    from launcher.run.parallel_config import data_parallel_sizes
    from launcher.run.scaling import accumulation_steps, worker_range

    d, tp = config.data, config.parallel.tp
    lo, hi = worker_range(config.job.num_workers)
    parts = []
    for w, dp in zip(range(lo, hi + 1), data_parallel_sizes(config.job.num_workers, tp)):
        accum = accumulation_steps(d.batch_size, dp, d.micro_batch_size)
        who = (f"{w} worker{'s' if w != 1 else ''}" if tp == 1 else
               f"{dp} data-parallel replica{'s' if dp != 1 else ''} ({w} workers, tp {tp})")
        parts.append(f"{who} x {accum} micro-batch{'es' if accum != 1 else ''}"
                     f" (accumulation steps) x {d.batch_size // dp // accum} sequences")
    return (f"batch split: global batch {d.batch_size} sequences x {d.block_size} tokens = "
            + "; or ".join(parts))


def _usage_error(exc: BaseException) -> int:
    """A bad command line, config, storage or resume point: one line on stderr, status 2."""
    print(f"sharded-ams train: error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def _add_ckpt_parser(subparsers) -> None:
    """``sharded-ams ckpt ...`` lives in launcher/commands/ckpt.py (imported only when needed)."""
    try:
        from launcher.commands.ckpt import add_ckpt_subparser
    except ImportError as exc:
        reason = f"{type(exc).__name__}: {exc}"
        p = subparsers.add_parser("ckpt", help="checkpoint tools (unavailable)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(_args: argparse.Namespace) -> int:
            print(f"sharded-ams ckpt: not available ({reason})", file=sys.stderr)
            return 2

        p.set_defaults(func=unavailable)
        return
    add_ckpt_subparser(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharded-ams",
        description="ZeRO-1 sharded AMS/Grams training: launch and resume jobs with Ray Train, "
                    "and work with their checkpoints.",
    )
    from sharded_ams import __version__

    parser.add_argument("--version", action="version", version=f"sharded-ams {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train_parser(subparsers)
    from launcher.data.prepare import add_prepare_parser

    add_prepare_parser(subparsers)
    _add_ckpt_parser(subparsers)
    from launcher.plan.command import add_plan_subparser

    add_plan_subparser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sharded-ams`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `sharded-ams ckpt inspect DIR | head`: the reader is gone
        # stdout to /dev/null, so that the interpreter's flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
