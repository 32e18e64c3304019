"""Checkpoints of :class:`~sharded_ams.ShardedAMS` training: a documented on-disk format
that loads on any world size (``docs/checkpoint.md``). No Ray here: the launcher calls
these functions from its training loop.

Where things are:

* ``format.py``: file and directory names, the parsed :class:`Manifest`,
  :class:`CheckpointError` and its kinds;
* ``validate.py``: **every rule** a directory on disk must pass before it is used
  (no symlinks or FIFOs, sizes and checksums, the manifest's fields, file contents);
* ``commit.py``: saving, and **the commit rule** (a directory is a checkpoint once its
  manifest exists; rank 0 writes it last; a re-save is swapped in after its commit);
* ``load.py``: loading and resharding N -> M;
* ``manager.py``: finding the latest checkpoint, ``CheckpointManager``, retention, and
  the writer lock;
* ``dcp.py`` / ``dcp_meta.py``: checkpoints of FSDP2 / tensor-parallel runs in
  ``torch.distributed.checkpoint`` format under the same rules (commit last, checksums,
  the DCP metadata pickle read through an allowlist); ``dcp_reader.py``: DCP's reads,
  through the fds the checks hashed, each chunk of its metadata's dtype and shape;
* ``consolidate.py``: one unsharded state for the single-process ``AMS``, and its export;
* ``snapshot.py`` / ``group.py``: CPU snapshots (pinned, one sync) and RNG states; the
  process group and how ranks agree on an error.
"""

from .commit import SaveHandle, save_checkpoint
from .consolidate import consolidate, export_consolidated
from .format import (FORMAT, FORMAT_VERSION, LOCK_NAME, MANIFEST_NAME, MODEL_EXTRA_NAME,
                     TRAINER_NAME, CheckpointError, Manifest, shard_file_name, step_dir_name)
from .load import load_checkpoint
from .manager import CheckpointManager, find_latest_checkpoint
from .dcp import load_dcp, save_dcp
from .dcp_meta import DCP_FORMAT, DCPManifest, manifest_format, validate_dcp
from .dcp_meta import validate_any as validate_checkpoint
from .validate import read_manifest

__all__ = ["CheckpointError", "Manifest", "SaveHandle", "CheckpointManager", "save_checkpoint",
           "load_checkpoint", "validate_checkpoint", "read_manifest", "find_latest_checkpoint",
           "consolidate", "export_consolidated", "FORMAT", "FORMAT_VERSION", "MANIFEST_NAME",
           "MODEL_EXTRA_NAME", "TRAINER_NAME", "LOCK_NAME", "shard_file_name", "step_dir_name",
           "save_dcp", "load_dcp", "validate_dcp", "manifest_format", "DCPManifest", "DCP_FORMAT"]
