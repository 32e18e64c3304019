"""``ckpt inspect`` of a DCP checkpoint (an ``fsdp`` run's, ``sharded_ams.checkpoint.dcp``):
the manifest's record (step, mesh, files) and, when the metadata is read (checksums on),
what DCP's index says of the model and optimizer state, and every field a load would
refuse as unsound (NaN/inf, a negative ``exp_avg_sq``), read one chunk at a time. The metadata is read through
``sharded_ams.checkpoint.dcp_meta``'s allowlist, never ``pickle.load``."""

from __future__ import annotations

import math
from typing import Optional

__all__ = ["inspect_dcp", "print_dcp", "add_convert_command"]


def _summary(md, tied: dict) -> dict:
    """Params (the ``model.`` tensors, a tied weight once: DCP stores it under every key) and
    state bytes per key (``optim.state.FQN.KEY``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    params, numel, state = 0, 0, {}
    aliases = {"model." + k for k in tied}
    for key, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        n = math.prod(item.size)
        nbytes = n * item.properties.dtype.itemsize
        if key.startswith("model.") and key not in aliases:
            params, numel = params + 1, numel + n
        elif key.startswith("optim.state.") and not key.endswith(".step"):
            skey = key.rsplit(".", 1)[1]
            state[skey] = state.get(skey, 0) + nbytes
    return {"num_params": params, "numel": numel, "state_keys": sorted(state),
            "state_bytes": state, "state_bytes_total": sum(state.values())}


def inspect_dcp(path: str, *, checksums: bool = True) -> dict:
    """As ``inspect_checkpoint`` for a DCP checkpoint (``valid``, ``reason`` and what a
    well-formed manifest tells)."""
    from sharded_ams.checkpoint import CheckpointError
    from sharded_ams.checkpoint.dcp_meta import CheckedFiles, check_files, read_dcp_manifest
    from sharded_ams.checkpoint.dcp_reader import dcp_value_report
    from sharded_ams.checkpoint.values import describe_dcp_problem

    out: dict = {"path": str(path), "valid": False, "reason": None, "format": "dcp",
                 "unsound_values": None}
    man, md = None, None
    try:
        man = read_dcp_manifest(path)
        with CheckedFiles(man) as files:
            md = check_files(man, files, checksums)
            bad = dcp_value_report(man, md, files) if checksums else None
        out["valid"], out["unsound_values"] = not bad, bad
        if bad:  # as the native format's: a load refuses it
            out["reason"] = (f"{man.path}: {describe_dcp_problem(bad[0])} ({len(bad)} fields "
                             "in all); a load refuses it unless allow_nonfinite=True")
    except CheckpointError as exc:
        out["reason"] = str(exc)
        try:
            man = read_dcp_manifest(path)
        except CheckpointError:
            return out
    raw = man.raw
    out.update({"step": man.step, "world_size": man.world_size, "mesh": man.mesh,
                "created": man.created, "torch_version": raw.get("torch_version"),
                "optimizer": raw["optimizer"].get("class"), "hyperparameters": man.param_groups,
                "files_bytes": man.files_bytes,
                "files": {n: int(f["size"]) for n, f in man.files.items()}})
    if md is not None:
        out.update(_summary(md, man.tied))
    return out


def print_dcp(info: dict, fmt_bytes) -> Optional[int]:
    """The text form; returns the exit code (0 valid, 1 not)."""
    print(f"checkpoint: {info['path']} (DCP format)")
    print("status:     " + ("valid" if info["valid"] else f"INVALID: {info['reason']}"))
    if "step" not in info:
        return 1
    mesh = info["mesh"]
    print(f"step:       {info['step']}")
    print(f"world size: {info['world_size']} ({mesh.get('strategy', 'fsdp')}: dp {mesh['dp']} x "
          f"tp {mesh['tp']})")
    print(f"created:    {info['created']}")
    print(f"optimizer:  {info['optimizer']}")
    if "num_params" in info:
        print(f"params:     {info['num_params']} tensors, {info['numel']:,} elements")
        for k, v in info["state_bytes"].items():
            print(f"state {k + ':':<12}{fmt_bytes(v)}")
        print(f"state total:      {fmt_bytes(info['state_bytes_total'])}")
    print(f"files:      {len(info['files'])}, {fmt_bytes(info['files_bytes'])}")
    for p in (info.get("unsound_values") or [])[:10]:
        print(f"unsound:    {p['file']}: {p['field']}: {p['nonfinite']} NaN/inf, "
              f"{p['negative']} negative")
    for i, g in enumerate(info["hyperparameters"]):
        print(f"group {i}:    " + ", ".join(f"{k}={v}" for k, v in g.items()))
    return 0 if info["valid"] else 1


def _cmd_convert(args) -> int:
    """Exit status as every command's (:mod:`launcher.commands.outputs`): 2 refused, 1 failed.
    SRC may be a run directory: its newest usable checkpoint, as ``ckpt export`` reads."""
    import os
    import sys
    from pathlib import Path

    from launcher.commands.outputs import (EXIT_FAILED, EXIT_REFUSED, NONFINITE_HINT, Refused,
                                           check_output, newest_usable)
    from sharded_ams.checkpoint import DCP_FORMAT, CheckpointError, manifest_format
    from sharded_ams.checkpoint.convert import to_dcp, to_zero1

    def convert(src):
        have = "dcp" if manifest_format(src) == DCP_FORMAT else "zero1"
        if have == args.to:  # not a CheckpointError: no fallback to an older checkpoint
            raise Refused(f"{src} is already a {have} checkpoint")
        return (to_dcp if args.to == "dcp" else to_zero1)(src, args.out,
                                                          allow_nonfinite=args.allow_nonfinite)

    try:
        if os.path.lexists(args.out):
            raise Refused(f"{args.out} exists; give a new directory")
        check_output(Path(args.out).absolute(), [Path(args.src)], force=False,
                     ours=lambda _: False, what="")  # not inside SRC, nor through a link
        src, done = newest_usable(args.src, convert,
                                  lambda msg: print(msg, file=sys.stderr, flush=True))
    except (Refused, CheckpointError) as exc:
        print(f"sharded-ams ckpt convert: error: {' '.join(str(exc).split())}"
              f"{NONFINITE_HINT if getattr(exc, 'kind', None) == 'values' else ''}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"sharded-ams ckpt convert: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    strategy = "fsdp" if args.to == "dcp" else "zero1"
    print(f"wrote {args.out} ({args.to}) from {src}: step {done['step']}, {done['params']} params; "
          f"start a run from it with parallel.strategy = \"{strategy}\" and job.resume_from = "
          f"{args.out}")
    return 0


def add_convert_command(sub) -> None:
    """``ckpt convert SRC OUT --to dcp|zero1``."""
    c = sub.add_parser("convert", help="convert a checkpoint between zero1 and DCP (fsdp)",
                       description="Write SRC (a zero1 or a DCP checkpoint) in the other "
                                   "format, so that a run can switch parallel.strategy. "
                                   "Every tensor is kept bit for bit.")
    c.add_argument("src", help="checkpoint directory (holding manifest.json), or a run "
                               "directory: its newest usable checkpoint")
    c.add_argument("out", help="new checkpoint directory")
    c.add_argument("--to", required=True, choices=("dcp", "zero1"),
                   help="dcp: for parallel.strategy fsdp; zero1: for ShardedAMS")
    from launcher.commands.outputs import add_allow_nonfinite

    add_allow_nonfinite(c)
    c.set_defaults(func=_cmd_convert)
