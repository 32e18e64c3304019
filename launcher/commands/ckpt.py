"""``ckpt`` commands: inspect and consolidate sharded-ams checkpoints (no Ray needed).

    sharded-ams ckpt inspect DIR [--json] [--no-checksums]    # DIR: a checkpoint or a run
    sharded-ams ckpt consolidate DIR OUT
    sharded-ams ckpt export CKPT OUT --format hf|safetensors    # launcher/commands/export.py
    sharded-ams ckpt convert SRC OUT --to dcp|zero1             # launcher/commands/ckpt_dcp.py
    python -m launcher.commands.ckpt inspect DIR          # the same, standalone

``launcher/cli.py`` registers them with :func:`add_ckpt_subparser`. Every leaf parser sets
``func``: call ``args.func(args)``; it returns the process exit code, the convention of every
``sharded-ams`` command (:mod:`launcher.commands.outputs`): 0 ok, 1 ran and failed (``inspect``:
the checkpoint is invalid), 2 refused (bad arguments, checkpoint or OUT; nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["add_ckpt_subparser", "main", "inspect_checkpoint"]


def inspect_checkpoint(path: str, *, checksums: bool = True) -> dict:
    """Summary of a checkpoint directory as a JSON-able dict (``valid`` and ``reason``
    say whether it loads; whatever a well-formed manifest tells is filled in even if a
    file is bad). The hyperparameters shown are the ones a load applies: a shard whose
    own differ is refused by the load."""
    from sharded_ams.checkpoint import (DCP_FORMAT, CheckpointError, manifest_format,
                                        read_manifest, validate_checkpoint)
    from sharded_ams.checkpoint.values import describe_problem

    if manifest_format(path) == DCP_FORMAT:  # an fsdp run's (launcher/commands/ckpt_dcp.py)
        from launcher.commands.ckpt_dcp import inspect_dcp

        return inspect_dcp(path, checksums=checksums)
    out: dict = {"path": str(path), "valid": False, "reason": None, "unsound_values": None}
    man = None
    try:
        bad: list = []  # pieces with NaN/inf or a negative exp_avg_sq: a load refuses them
        man = validate_checkpoint(path, checksums=checksums, value_report=bad)
        out["valid"], out["unsound_values"] = not bad, bad if checksums else None
        if bad:
            out["reason"] = (f"{Path(path) / bad[0]['file']}: {describe_problem(bad[0])} "
                             f"({len(bad)} pieces in all); a load refuses it unless "
                             "allow_nonfinite=True")
    except CheckpointError as exc:
        out["reason"] = str(exc)
        try:  # a manifest that passes its own rules is still worth showing
            man = read_manifest(path)
        except CheckpointError:
            man = None
    if man is None:
        return out
    groups = []
    for g in man.param_groups:
        hp = {k: v for k, v in g.items() if k != "params"}
        hp["num_params"] = len(g["params"])
        groups.append(hp)
    sb = man.state_bytes()
    out.update({
        "step": man.step, "world_size": man.world_size, "created": man.created,
        "format_version": man.version, "torch_version": man.torch_version,
        "optimizer": man.optimizer.get("class"), "state_keys": man.state_keys,
        "num_params": len(man.params), "numel": man.numel(),
        "state_bytes": sb, "state_bytes_total": sum(sb.values()),
        "files_bytes": man.files_bytes(),
        "files": {n: int(f["size"]) for n, f in man.files.items()},
        "hyperparameters": groups,
        "skipped_steps": man.optimizer.get("skipped_steps", 0),
        "has_model_extra": man.model is not None,
    })
    return out


def _checkpoint_dir(path: str) -> str:
    """``path`` itself, or, for a run directory (no manifest.json, committed checkpoints in
    it), its newest committed checkpoint, so ``ckpt inspect runs/NAME`` works like
    ``ckpt export``. Anything else is passed on to give its usual error."""
    import os

    from sharded_ams.checkpoint import find_latest_checkpoint

    if not os.path.isdir(path) or os.path.lexists(os.path.join(path, "manifest.json")):
        return path
    latest = find_latest_checkpoint(path, checksums=False)
    if latest is None:
        print(f"{path}: not a checkpoint, nor a run directory holding a committed one",
              file=sys.stderr)
        return path
    print(f"{path}: newest committed checkpoint {latest}", file=sys.stderr)
    return str(latest)


def _say_fallback(run_dir: str, newest: str, checksums: bool) -> None:
    """On stderr: the newest valid checkpoint older than the invalid ``newest``, which a
    training resume loads instead (or that there is none)."""
    from sharded_ams.checkpoint import find_latest_checkpoint

    older = find_latest_checkpoint(run_dir, checksums=checksums,
                                   on_skip=lambda *_: None)
    print(f"{run_dir}: " + (f"a resume would load {older}, the newest valid checkpoint"
                            if older is not None else "no valid checkpoint to resume from"),
          file=sys.stderr)


def _fmt_bytes(n: int) -> str:
    """'1.5 MiB (1,572,864 B)': human size plus the exact byte count."""
    if n < 1024:
        return f"{n:,} B"
    x, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        x /= 1024
        if x < 1024:
            break
    return f"{x:,.1f} {unit} ({n:,} B)"


def _cmd_inspect(args: argparse.Namespace) -> int:
    path = _checkpoint_dir(args.dir)
    info = inspect_checkpoint(path, checksums=not args.no_checksums)
    if path != args.dir and not info["valid"]:  # a run directory: what a resume falls back to
        _say_fallback(args.dir, path, checksums=not args.no_checksums)
    if args.json:
        print(json.dumps(info, indent=2, default=repr))
        return 0 if info["valid"] else 1
    if info.get("format") == "dcp":
        from launcher.commands.ckpt_dcp import print_dcp

        return print_dcp(info, _fmt_bytes)
    print(f"checkpoint: {info['path']}")
    print("status:     " + ("valid" if info["valid"] else f"INVALID: {info['reason']}"))
    if "step" not in info:
        return 1
    print(f"step:       {info['step']}")
    print(f"world size: {info['world_size']}")
    print(f"created:    {info['created']}")
    print(f"optimizer:  {info['optimizer']} (state keys: {', '.join(info['state_keys'])}; "
          f"skipped steps: {info['skipped_steps']})")
    print(f"params:     {info['num_params']} tensors, {info['numel']:,} elements")
    for k, v in info["state_bytes"].items():
        print(f"state {k + ':':<12}{_fmt_bytes(v)}")
    print(f"state total:      {_fmt_bytes(info['state_bytes_total'])}")
    print(f"files:      {len(info['files'])}, {_fmt_bytes(info['files_bytes'])}")
    for p in (info["unsound_values"] or [])[:10]:
        print(f"unsound:    {p['file']}: {p['key']} of {p['param']} [{p['offset']}, "
              f"{p['offset'] + p['length']}): {p['nonfinite']} NaN/inf, {p['negative']} negative")
    for i, g in enumerate(info["hyperparameters"]):
        hp = ", ".join(f"{k}={v}" for k, v in g.items())
        print(f"group {i}:    {hp}")
    return 0 if info["valid"] else 1


def _cmd_consolidate(args: argparse.Namespace) -> int:
    """Exit status as every command's (:mod:`launcher.commands.outputs`): 2 refused, 1 failed."""
    import torch

    from launcher.commands.outputs import (EXIT_FAILED, EXIT_REFUSED, NONFINITE_HINT, Refused,
                                           check_output, is_torch_save_file, newest_usable)
    from sharded_ams.checkpoint import CheckpointError, export_consolidated

    out = Path(args.out).expanduser().absolute()
    try:
        check_output(out, [Path(args.dir)], force=args.force, ours=is_torch_save_file,
                     what="an earlier consolidated file (torch.save)")
        path, full = newest_usable(args.dir, lambda p: export_consolidated(
            p, out, allow_nonfinite=args.allow_nonfinite), _note)
    except (Refused, CheckpointError, IsADirectoryError) as exc:
        print(f"sharded-ams ckpt consolidate: error: {' '.join(str(exc).split())}"
              f"{NONFINITE_HINT if getattr(exc, 'kind', None) == 'values' else ''}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"sharded-ams ckpt consolidate: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    n = sum(t.numel() for t in full["model"].values() if isinstance(t, torch.Tensor))
    print(f"wrote {args.out} from {path}: step {full['step']}, {len(full['param_names'])} optimized "
          f"params, {len(full['model'])} model state_dict entries ({n:,} elements); load with "
          "AMS.load_state_dict(torch.load(OUT)['optimizer']) and "
          "model.load_state_dict(torch.load(OUT)['model'])")
    return 0


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_commands(sub) -> None:
    p = sub.add_parser("inspect", help="summarise and validate a checkpoint directory",
                       description="Print step, world size, params, state sizes, "
                                   "hyperparameters and whether the checkpoint is valid "
                                   "(manifest, file sizes, sha256). Exit code 1 if invalid.")
    p.add_argument("dir", help="checkpoint directory (holding manifest.json), or a run "
                                   "directory: its newest committed checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--no-checksums", action="store_true",
                   help="check sizes only, skip the sha256 of every file (faster)")
    p.set_defaults(func=_cmd_inspect)
    c = sub.add_parser("consolidate", help="write one unsharded state (model + AMS optimizer)",
                       description="torch.save the unsharded state of a checkpoint of any "
                                   "world size: {'model', 'optimizer', 'param_names', 'step', "
                                   "...}, loadable by a single-process sharded_ams.AMS.")
    c.add_argument("dir", help="checkpoint directory, or a run directory: its newest "
                                   "committed checkpoint")
    c.add_argument("out", help="output file (.pt)")
    c.add_argument("--force", action="store_true",
                   help="replace OUT if it is an earlier consolidated file")
    from launcher.commands.outputs import add_allow_nonfinite

    add_allow_nonfinite(c)
    c.set_defaults(func=_cmd_consolidate)
    from launcher.commands.export import add_export_command  # `ckpt export` (launcher/commands/export.py)

    add_export_command(sub)
    from launcher.commands.ckpt_dcp import add_convert_command  # `ckpt convert`

    add_convert_command(sub)


def add_ckpt_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``ckpt {inspect,consolidate}`` to ``subparsers`` (from ``add_subparsers()``)."""
    p = subparsers.add_parser("ckpt", help="inspect or consolidate checkpoints",
                              description="Inspect or consolidate sharded-ams checkpoints.")
    sub = p.add_subparsers(dest="ckpt_command", metavar="{inspect,consolidate,export,convert}")
    sub.required = True
    _add_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.commands.ckpt",
                                     description="Inspect or consolidate sharded-ams checkpoints.")
    sub = parser.add_subparsers(dest="ckpt_command", metavar="{inspect,consolidate,export,convert}")
    sub.required = True
    _add_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
