"""The on-disk format: file and directory names, the parsed manifest, the error type.

A checkpoint is one directory (``docs/checkpoint.md`` has the full schema)::

    step-00001000/
        shard-rank00000-of-00004.pt   # rank r's optimizer.state_dict() + its RNG states
        ...
        model-extra.pt                # rank 0: buffers and frozen params (only with model=)
        trainer.pt                    # rank 0: step, lr_scheduler state, ``extra``
        manifest.json                 # rank 0, written LAST: sizes + sha256 of every file

What a directory must satisfy to be loaded is in ``validate.py``; how it is written and
committed, in ``commit.py``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

#: a param group's hyperparameters, as every format records them
HP_KEYS = ("lr", "betas", "beta3", "lam", "eps", "weight_decay")

FORMAT = "sharded_ams.checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_EXTRA_NAME = "model-extra.pt"
TRAINER_NAME = "trainer.pt"
TMP_SUFFIX = ".tmp"
#: the writer lock of a CheckpointManager root (see manager.py)
LOCK_NAME = ".sharded-ams.lock"

STEP_DIR_RE = re.compile(r"^step-(\d+)$")
#: directories a re-save of a committed step creates beside it (see commit.py)
RESAVE_DIR_RE = re.compile(r"^step-(\d+)\.(?:new|old)-[0-9a-f]{8}$")
SHARD_RE = re.compile(r"^shard-rank(\d{5})-of-(\d{5})\.pt$")

#: the state keys a shard may hold; ``master`` (fp32 weights) is always there
STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_s", "master")
REQUIRED_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")
#: param dtypes a manifest may name (the model's dtypes; optimizer state is fp32 or bf16)
PARAM_DTYPES: dict[str, torch.dtype] = {
    str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}

PathLike = Union[str, os.PathLike]


def shard_file_name(rank: int, world_size: int) -> str:
    return f"shard-rank{rank:05d}-of-{world_size:05d}.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (or written). ``kind`` says why:

    * ``"uncommitted"``: no ``manifest.json`` (a save that never finished);
    * ``"format"``: the manifest does not parse, or a field breaks a rule of
      ``validate.py`` (``field`` names it, e.g. ``files['trainer.pt'].size``);
    * ``"missing"``: a file named by the manifest (or the directory) is absent;
    * ``"unsafe"``: a symlink or something that is not a regular file (FIFO, device)
      where a checkpoint file should be: refused without reading it;
    * ``"corrupt"``: a file's size or sha256 differs from the manifest, it does not load,
      or its content disagrees with the manifest;
    * ``"values"``: a shard holds NaN/inf or a negative ``exp_avg_sq`` (``values.py``; a
      DCP checkpoint's master or moment alike, ``field`` its DCP key): refused by a load,
      ``consolidate`` and ``ckpt convert`` unless ``allow_nonfinite=True``;
    * ``"model_mismatch"``: parameter names/shapes (or buffers) differ from the model's;
    * ``"optimizer_mismatch"``: optimizer class, state keys or param groups differ;
    * ``"scheduler_mismatch"``: the saved ``lr_scheduler`` state does not load into the
      scheduler given (``field="lr_scheduler"``; another scheduler class, or a damaged
      ``trainer.pt``);
    * ``"save_failed"``: a rank could not prepare or write its files (nothing was
      committed; ``save_dcp``: also a directory that already holds a checkpoint);
    * ``"locked"``: another CheckpointManager (another job) is writing to the same root.

    ``path`` is the file (or directory) concerned; ``field`` the manifest or file field.
    """

    def __init__(self, message: str, *, path: Optional[PathLike] = None, kind: str = "corrupt",
                 field: Optional[str] = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.kind = kind
        self.field = field

    #: kinds after which an older checkpoint may still be good (used by ``load_latest``)
    RECOVERABLE = frozenset({"uncommitted", "format", "missing", "unsafe", "corrupt", "values"})


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a committed checkpoint. Only
    ``validate.read_manifest`` builds one, after every rule held, so the numbers here are
    consistent with each other and with the files' sizes."""

    path: Path
    step: int
    world_size: int
    params: dict[str, dict]          # name -> {shape, dtype, group, numel}, in optimizer order
    optimizer: dict                  # class, state_format_version, param_groups, state_keys, ...
    files: dict[str, dict]           # file name -> {kind, size, sha256[, rank, pieces]}
    model: Optional[dict] = None     # {"keys": {state_dict key: {...}}} or None (no model=)
    created: str = ""
    created_unix: float = 0.0
    format: str = FORMAT
    version: int = FORMAT_VERSION
    torch_version: str = ""
    sharded_ams_version: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def state_keys(self) -> list[str]:
        return list(self.optimizer["state_keys"])

    @property
    def param_names(self) -> list[str]:
        return list(self.params)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer["param_groups"]

    def shard_files(self) -> list[str]:
        """Shard file names in rank order."""
        return [shard_file_name(r, self.world_size) for r in range(self.world_size)]

    def numel(self) -> int:
        return sum(p["numel"] for p in self.params.values())

    def state_bytes(self) -> dict[str, int]:
        """Bytes of each optimizer state over all ranks, unpadded, if stored in fp32."""
        n = self.numel()
        return {k: 4 * n for k in self.state_keys}

    def files_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


def param_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype string (validated against PARAM_DTYPES)."""
    return PARAM_DTYPES[name]


def prod(shape) -> int:
    return math.prod(int(s) for s in shape)
