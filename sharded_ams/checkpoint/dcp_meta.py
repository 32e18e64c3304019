"""The rules a DCP checkpoint directory (``format: sharded_ams.dcp``, written by
:mod:`sharded_ams.checkpoint.dcp`) must pass before anything in it is used.

It is a ``torch.distributed.checkpoint`` directory (``.metadata`` and ``__R_0.distcp``
data files) plus our ``trainer.pt`` and ``manifest.json``, the commit record written last.
Input from disk may be planted, so:

1. **manifest.json** is read as the native format's (bounded size and nesting), every
   field typed and ranged; file names come from a fixed pattern (no path separators).
2. **Every file** is a regular file (no symlink, FIFO, device) with the manifest's size,
   and with ``checksums`` its sha256.
3. **.metadata is a pickle**, and torch's ``FileSystemReader.read_metadata`` calls
   ``pickle.load`` on it: any callable can run. We never do that. It is unpickled here by
   :class:`_MetadataUnpickler`, which resolves only the classes DCP's metadata is made of
   (``torch.distributed.checkpoint.metadata`` and ``filesystem._StorageInfo``, torch
   dtypes, ``torch.Size``, ``pathlib`` paths); any other global is refused before it is
   looked up. The result is then checked: every item's storage lies inside a listed data
   file (``relative_path`` a listed name, ``offset + length`` within its size), no two
   items share a byte, no item has stream transforms (``transform_descriptors``: none is
   written, and DCP's zstd inflates without bound), every chunk inside its tensor, the chunks of each tensor tile it exactly once (each with a
   storage entry: DCP does not check that every element is read), dtypes torch dtypes,
   the nesting paths (``planner_data``) of every item small tuples of names and list
   indices, sizes bounded.
4. DCP's default load planner reads non-tensor items (param groups, ints) with
   ``torch.load(weights_only=False)``, i.e. unpickles them; :class:`SafeLoadPlanner` loads
   them with ``weights_only=True`` instead. Tensor items are read with
   ``torch.load(weights_only=True)``, into tensors the loading model allocated (their
   shapes are compared with the metadata's before the load: a mismatch is "different
   model", not DCP's bare AssertionError). Each item is a ``torch.save`` zip, and
   ``torch.load`` inflates compressed records: with checksums every item's zip directory
   is read (``_check_items``: records stored, within the item).
5. **What is read is what was checked**: every file is read through the fd its checks
   hashed (:class:`CheckedFiles`; ``dcp_reader.reader_of`` for DCP's reads, which would
   open the data files again by name), each stored chunk must be a tensor of its
   metadata's dtype and chunk shape (``dcp_reader``), and what DCP raises is a
   CheckpointError (:func:`refusing`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Optional

import torch

from .contents import check_rng
from .format import CheckpointError, MANIFEST_NAME, PathLike, TRAINER_NAME
from .jsonread import MAX_MANIFEST_BYTES, parse_json
from .rules import Rules, check_hparams
from .validate import _check_zip, _torch_load_fd, open_checked, open_regular
from .validate import validate_checkpoint as validate_native

__all__ = ["DCP_FORMAT", "DCP_VERSION", "METADATA_NAME", "DCPManifest", "read_dcp_manifest",
           "read_dcp_metadata", "validate_dcp", "check_dcp_files", "check_dcp_items",
           "CheckedFiles", "check_files",
           "load_trainer", "load_rng", "validate_any", "manifest_format", "data_file_name",
           "rng_file_name", "refusing"]

DCP_FORMAT = "sharded_ams.dcp"
DCP_VERSION = 1
METADATA_NAME = ".metadata"
DATA_RE = re.compile(r"^__(\d{1,6})_(\d{1,6})\.distcp$")
#: each rank's RNG states (torch, python, numpy, CUDA), restored on the same world size
RNG_RE = re.compile(r"^rng-rank(\d{5})\.pt$")
#: the .metadata of a 70B model is a few MB; a larger one is refused unread
MAX_METADATA_BYTES = 256 << 20
_MAX_DIMS = 64
#: chunks of one tensor: DCP writes one per rank (a ShardedAMS at most 2 ndim - 1)
_MAX_CHUNKS = 1 << 20
#: a list index in a nesting path (param groups, list-valued state)
_MAX_INDEX = 1 << 16

#: the globals DCP's metadata pickle may name: its own dataclasses and torch's value types
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16",
              "int8", "uint8", "bool", "complex64", "complex128"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


@contextlib.contextmanager
def refusing(path: PathLike) -> Iterator[None]:
    """Whatever else the checked data still makes fail here (a value of a type no rule
    expected, DCP's own errors) is a CheckpointError naming ``path``, not a traceback:
    ``ckpt consolidate``/``export``/``convert`` then refuse it in one line. An OSError (the
    disk) and a MemoryError (the machine) are not the data's fault and pass through.
    DCP raises what failed in a read wrapped in its ``CheckpointException``, a
    BaseException (not an Exception): it is unwrapped, and judged by what it wraps."""
    try:
        yield
    except (CheckpointError, OSError, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 - untrusted input: any failure is a refusal
        inner = _dcp_failure(exc)
        if inner is None and not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit
        inner = exc if inner is None else inner
        if isinstance(inner, (CheckpointError, OSError, MemoryError)):
            raise inner from None
        raise CheckpointError(f"{path}: cannot be read ({type(inner).__name__}: "
                              f"{' '.join(str(inner).split())[:200]})", path=path,
                              kind="corrupt") from exc


def _dcp_failure(exc: BaseException) -> Optional[BaseException]:
    """The exception of the lowest failing rank in DCP's ``CheckpointException``."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # torch without distributed
        return None
    if not isinstance(exc, CheckpointException) or not exc.failures:
        return None
    first = exc.failures[min(exc.failures)]
    return first[0] if isinstance(first, tuple) else first


def data_file_name(rank: int) -> str:
    return f"__{rank}_0.distcp"


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name not in _ALLOWED.get(module, ()):
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of DCP metadata")
        return super().find_class(module, name)


@dataclass
class DCPManifest:
    """A parsed, checked DCP manifest."""

    path: Path
    step: int
    world_size: int
    mesh: dict
    param_groups: list
    files: dict
    created: str
    raw: dict
    format: str = DCP_FORMAT
    #: state_dict keys of tied weights -> the param they are (``lm_head.weight`` ->
    #: ``wte.weight``); empty in checkpoints written before it was recorded
    tied: dict = field(default_factory=dict)

    @property
    def files_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


def manifest_format(path: PathLike) -> Optional[str]:
    """The ``format`` field of ``path/manifest.json`` (None: none, or unreadable)."""
    mpath = Path(path) / MANIFEST_NAME
    try:
        with open_regular(mpath, max_size=MAX_MANIFEST_BYTES) as (fd, size):
            d = parse_json(os.read(fd, size + 1), mpath)
    except CheckpointError:
        return None
    return d.get("format") if isinstance(d, dict) and isinstance(d.get("format"), str) else None


def read_dcp_manifest(path: PathLike) -> DCPManifest:
    """Parse and check ``path/manifest.json`` of a DCP checkpoint (no other file opened)."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not os.path.lexists(mpath):
        raise CheckpointError(f"{path}: not a committed checkpoint (no {MANIFEST_NAME}; the save "
                              "did not finish)", path=mpath, kind="uncommitted")
    with open_regular(mpath, max_size=MAX_MANIFEST_BYTES) as (fd, size):
        d = parse_json(os.read(fd, size + 1), mpath)
    r = Rules(mpath)
    d = r.dict_(d, "")
    if d.get("format") != DCP_FORMAT:
        raise r.fail("format", f"{d.get('format')!r:.60}, expected {DCP_FORMAT!r}")
    version = r.int_(r.get(d, "version", ""), "version", 1)
    if version > DCP_VERSION:
        raise r.fail("version", f"{version} is newer than this code reads ({DCP_VERSION})")
    step = r.int_(r.get(d, "step", ""), "step")
    world = r.int_(r.get(d, "world_size", ""), "world_size", 1, 1 << 20)
    mesh = r.dict_(r.get(d, "mesh", ""), "mesh")
    for key in ("dp", "tp"):
        r.int_(r.get(mesh, key, "mesh"), f"mesh.{key}", 1, world)
    if mesh["dp"] * mesh["tp"] != world:
        raise r.fail("mesh", f"dp x tp = {mesh['dp']} x {mesh['tp']} is not world_size {world}")
    opt = r.dict_(r.get(d, "optimizer", ""), "optimizer")
    groups = r.list_(r.get(opt, "param_groups", "optimizer"), "optimizer.param_groups")
    for i, g in enumerate(groups):
        check_hparams(r, r.dict_(g, f"optimizer.param_groups[{i}]"), f"optimizer.param_groups[{i}]")
    r.int_(opt.get("skipped_steps", 0), "optimizer.skipped_steps")
    files = r.dict_(r.get(d, "files", ""), "files")
    _check_files(r, files, world)
    tied = r.dict_(d.get("tied", {}), "tied")
    for key, param in tied.items():
        r.name(key, f"tied[{key!r:.60}]")
        r.name(param, f"tied[{key!r:.60}]")
    return DCPManifest(path=path, step=step, world_size=world, mesh=mesh, param_groups=groups,
                       files=files, created=r.str_(d.get("created", ""), "created"), raw=d,
                       tied=tied)


def _check_files(r: Rules, files: dict, world: int) -> None:
    ranks = set()
    for name, entry in files.items():
        e = r.dict_(entry, f"files[{name!r:.60}]")
        m = DATA_RE.match(name) or RNG_RE.match(name)
        if not (m or name in (METADATA_NAME, TRAINER_NAME)):
            raise r.fail(f"files[{name!r:.60}]", "not a file name a DCP checkpoint has")
        r.int_(r.get(e, "size", f"files[{name!r}]"), f"files[{name!r}].size", 0)
        sha = r.str_(r.get(e, "sha256", f"files[{name!r}]"), f"files[{name!r}].sha256")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise r.fail(f"files[{name!r}].sha256", "not a sha256 hex digest")
        if m:
            if int(m.group(1)) >= world:
                raise r.fail(f"files[{name!r}]", f"rank {m.group(1)} >= world_size {world}")
            ranks.add(int(m.group(1)))
    for need in (METADATA_NAME, TRAINER_NAME):
        if need not in files:
            raise r.fail("files", f"{need} is not listed")


def _check_file(man: DCPManifest, name: str, checksum: bool) -> None:
    """``name`` is a regular file of the manifest's size (and sha256)."""
    with open_checked(man, name, checksum=checksum):
        pass


class CheckedFiles:
    """The files of one load, each opened once: checked (size, sha256) and then read
    through the same fd (its items' zip directories, DCP's reads), as the native format's
    ``open_checked``. A file renamed over since its check (same name, same size) is then
    never read: what is read is what was hashed. Checksummed files stay open until the
    ``with`` ends (``max_held`` at most: past that, one is checked again when it is read).
    """

    #: open fds held at most (a reshard from many ranks reads many files)
    MAX_HELD = 256

    def __init__(self, man: DCPManifest, max_held: Optional[int] = None) -> None:
        self.man, self.max_held = man, self.MAX_HELD if max_held is None else max_held
        self._fds: dict[str, int] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "CheckedFiles":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fds.clear()
        self._stack.close()

    def check(self, name: str, checksum: bool = True) -> None:
        """Size (and with ``checksum`` sha256) of ``name``; a checksummed one is kept open."""
        with self.open(name, checksum):
            pass

    @contextlib.contextmanager
    def open(self, name: str, checksum: bool = True) -> Iterator[int]:
        """An fd of ``name`` as checked: the one held, else opened and checked now."""
        fd = self._fds.get(name)
        if fd is None and checksum and len(self._fds) < self.max_held:
            fd = self._fds[name] = self._stack.enter_context(open_checked(self.man, name))
        if fd is not None:
            yield fd
            return
        with open_checked(self.man, name, checksum=checksum) as fd:
            yield fd


def read_dcp_metadata(man: DCPManifest, *, checksum: bool = True):
    """DCP's ``Metadata`` of a checked ``.metadata``, unpickled with the allowlist and its
    storage checked against the listed files (this module's docstring, rule 3)."""
    fpath = man.path / METADATA_NAME
    entry = man.files[METADATA_NAME]
    if entry["size"] > MAX_METADATA_BYTES:
        raise CheckpointError(f"{fpath}: {entry['size']} bytes, more than {MAX_METADATA_BYTES}",
                              path=fpath, kind="format")
    with open_checked(man, METADATA_NAME, checksum=checksum) as fd:
        data = os.read(fd, entry["size"] + 1)  # the hashed fd: what is unpickled was checked
    try:
        md = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - any failure of untrusted bytes is a refusal
        raise CheckpointError(f"{fpath}: refused ({type(exc).__name__}: {str(exc)[:200]})",
                              path=fpath, kind="unsafe") from None
    try:
        _check_metadata(man, md)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a field of an unexpected type
        raise CheckpointError(f"{fpath}: malformed metadata ({type(exc).__name__}: "
                              f"{str(exc)[:200]})", path=fpath, kind="corrupt") from None
    return md


def _check_metadata(man: DCPManifest, md: Any) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,
                                                       TensorStorageMetadata)

    fpath = man.path / METADATA_NAME
    def bad(msg: str) -> CheckpointError:
        return CheckpointError(f"{fpath}: {msg}", path=fpath, kind="corrupt")

    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise bad("not DCP metadata")
    for key, item in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise bad(f"key {key!r:.60} is not a string")
        if isinstance(item, BytesStorageMetadata):
            _need_storage(md, key, None, bad)
            continue
        if not isinstance(item, TensorStorageMetadata):
            raise bad(f"{key}: {type(item).__name__} is not tensor or bytes metadata")
        if not isinstance(getattr(item.properties, "dtype", None), torch.dtype):
            raise bad(f"{key}: dtype {getattr(item.properties, 'dtype', None)!r:.60} is not a "
                      "torch dtype")
        _check_chunks(md, key, item, bad)
    spans: dict[str, list] = {}
    for index, info in md.storage_data.items():
        if not isinstance(info, _StorageInfo):
            raise bad(f"storage of {index!r:.80} is not a _StorageInfo")
        rel = info.relative_path
        if not isinstance(rel, str) or not DATA_RE.match(rel) or rel not in man.files:
            raise bad(f"storage of {getattr(index, 'fqn', index)!r:.80} is in {rel!r:.80}, "
                      "not a data file the manifest lists")
        if not (type(info.offset) is int and type(info.length) is int and info.offset >= 0
                and info.length >= 0 and info.offset + info.length <= man.files[rel]["size"]):
            raise bad(f"storage of {getattr(index, 'fqn', index)!r:.80} lies outside {rel}")
        transforms = getattr(info, "transform_descriptors", None)
        if transforms is not None and (not isinstance(transforms, (list, tuple)) or transforms):
            raise bad(f"storage of {getattr(index, 'fqn', index)!r:.80} has stream transforms "
                      f"{transforms!r:.80} (e.g. compression, which inflates to any size): "
                      "checkpoints are written without any; refused")
        spans.setdefault(rel, []).append((info.offset, info.length, getattr(index, "fqn", "?")))
    _refuse_shared_bytes(spans, bad)
    _check_paths(md, bad)


def _refuse_shared_bytes(spans: dict, bad) -> None:
    """No two items' storage share a byte of a data file: DCP writes each item once, one
    after the other; two items over the same bytes would give one the other's value."""
    for rel, items in spans.items():
        end, last = 0, None
        for offset, length, fqn in sorted(items):
            if length and offset < end:
                raise bad(f"storage of {fqn!r:.80} overlaps that of {last!r:.80} in {rel} "
                          f"(bytes {offset} < {end}): each item has bytes of its own")
            if length and offset + length > end:
                end, last = offset + length, fqn


def _need_storage(md: Any, key: str, offsets: Optional[tuple], bad) -> None:
    """An item (a tensor's chunk at ``offsets``; bytes: None) has a storage entry: DCP
    reads nothing for one without, and the tensor would keep whatever memory held."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    index = MetadataIndex(key, None if offsets is None else torch.Size(offsets))
    if index not in md.storage_data:
        where = "" if offsets is None else f" (chunk at {offsets!r:.60})"
        raise bad(f"{key}{where}: no storage entry: nothing of it is stored")


def _check_chunks(md: Any, key: str, item: Any, bad) -> None:
    """The chunks of one tensor lie inside it and tile it exactly once (their volumes sum
    to its numel and no two overlap), each with a storage entry: a chunk missing, or two
    chunks over the same elements, would leave elements that nothing was read into (DCP
    does not check it: ``torch.empty`` memory, or the loading model's old values)."""
    size = tuple(item.size)
    if len(size) > _MAX_DIMS or not all(type(s) is int and s >= 0 for s in size):
        raise bad(f"{key}: size {size!r:.80} is not a shape")
    if not isinstance(item.chunks, list) or len(item.chunks) > _MAX_CHUNKS:
        raise bad(f"{key}: {type(item.chunks).__name__} of chunks is not a list of at most "
                  f"{_MAX_CHUNKS}")
    boxes, volume = [], 0
    for c in item.chunks:
        off, sz = tuple(getattr(c, "offsets", ())), tuple(getattr(c, "sizes", ()))
        if len(off) != len(size) or len(sz) != len(size) or not all(
                type(o) is int and type(s) is int and o >= 0 and s >= 0 and o + s <= n
                for o, s, n in zip(off, sz, size)):
            raise bad(f"{key}: chunk at {off!r:.60} of {sz!r:.60} is outside {size}")
        _need_storage(md, key, off, bad)
        n = math.prod(sz)
        volume += n
        if n:
            boxes.append((off, tuple(o + s for o, s in zip(off, sz))))
    if volume != math.prod(size):
        raise bad(f"{key}: its chunks hold {volume} elements, the tensor {math.prod(size)} "
                  f"(shape {list(size)}): they must tile it exactly once")
    _refuse_overlaps(key, boxes, bad)


def _refuse_overlaps(key: str, boxes: list, bad) -> None:
    """No two non-empty boxes ``(lo, hi)`` intersect. A sweep along the first dimension:
    only boxes whose first-dimension ranges meet are compared (a few per box in what DCP
    writes: rows split across ranks, or tp columns), so no all-pairs loop."""
    if not boxes or not boxes[0][0]:
        if len(boxes) > 1:  # 0-d: every chunk is the one element
            raise bad(f"{key}: {len(boxes)} chunks of a 0-d tensor overlap")
        return
    active: list = []
    for lo, hi in sorted(boxes):
        active = [b for b in active if b[1][0] > lo[0]]
        for alo, ahi in active:
            if all(a < h and l < b for a, b, l, h in zip(alo, ahi, lo, hi)):
                raise bad(f"{key}: chunks at {alo} and {lo} overlap: they must tile the "
                          "tensor exactly once")
        active.append((lo, hi))


def _check_paths(md: Any, bad) -> None:
    """``planner_data`` (where each item goes in the nested state dict) names every item
    and only those, each a path of names and small list indices: ``read_dcp_full`` builds
    the nested dict from it, and an index of 10**12 (or -5) is no list position."""
    paths = md.planner_data
    if not isinstance(paths, dict) or set(paths) != set(md.state_dict_metadata):
        extra = sorted(set(paths) ^ set(md.state_dict_metadata), key=repr)[:3] \
            if isinstance(paths, dict) else type(paths).__name__
        raise bad(f"the nesting paths (planner_data) do not name exactly the items ({extra!r:.200})")
    for key, where in paths.items():
        if not (isinstance(where, tuple) and 0 < len(where) <= _MAX_DIMS and all(
                (type(p) is str and p) or (type(p) is int and 0 <= p < _MAX_INDEX)
                for p in where)):
            raise bad(f"{key}: nesting path {where!r:.120} is not a non-empty tuple of names "
                      f"and list indices in [0, {_MAX_INDEX})")


def _check_items(man: DCPManifest, md: Any, files: CheckedFiles,
                 names: Optional[Collection[str]] = None) -> None:
    """Every item of the data files (a tensor's chunk, or a non-tensor value) is what DCP
    and ``SafeLoadPlanner`` hand to ``torch.load``: a ``torch.save`` zip. Its records must
    be stored, summing to at most the item's length (``validate._check_zip``, on the
    item's byte range): a DEFLATE record inflates to any size, and the files' sizes and
    sha256 would bound nothing. Reads each item's zip directory only (its last bytes),
    through ``files``' checked fds. ``names``: only the items in these data files (None:
    every one)."""
    by_file: dict[str, list] = {}
    for index, info in md.storage_data.items():
        if names is None or info.relative_path in names:
            by_file.setdefault(info.relative_path, []).append((info.offset, info.length, index))
    for rel, items in sorted(by_file.items()):
        with files.open(rel) as fd:
            for offset, length, index in sorted(items, key=lambda t: t[:2]):
                what = f"item {getattr(index, 'fqn', index)!r:.80} (bytes {offset}+{length})"
                _check_zip(fd, man.path / rel, offset, length, what)


def check_dcp_files(man: DCPManifest, files: CheckedFiles,
                    hashed: Optional[Collection[str]] = None) -> set[str]:
    """Every listed file but ``.metadata`` (``read_dcp_metadata``'s) is a regular file of
    its listed size; those in ``hashed`` (None: every one) also have their sha256, and stay
    open in ``files`` for the reads. Returns the names hashed: ``check_dcp_items`` then
    reads their items' zip directories."""
    done = set()
    for name in man.files:
        if name != METADATA_NAME:
            files.check(name, hashed is None or name in hashed)
            if hashed is None or name in hashed:
                done.add(name)
    return done


def check_dcp_items(man: DCPManifest, md: Any, files: CheckedFiles,
                    hashed: Collection[str]) -> None:
    """``_check_items`` of the data files in ``hashed`` (a rank's share, in ``load_dcp``:
    together the ranks read every item's zip directory)."""
    _check_items(man, md, files, {n for n in hashed if DATA_RE.match(n)})


def validate_dcp(path: PathLike, *, checksums: bool = True) -> DCPManifest:
    """Check a DCP checkpoint: its manifest, every file (size; sha256 with ``checksums``)
    and, with ``checksums``, its ``.metadata`` (unpickled safely and checked) and every
    data item's zip directory (``_check_items``). One process checks everything:
    ``load_dcp`` shares the sha256 work among its ranks (``dcp.hash_duty``)."""
    man = read_dcp_manifest(path)
    with CheckedFiles(man) as held:
        check_files(man, held, checksums)
    return man


def check_files(man: DCPManifest, files: CheckedFiles, checksums: bool = True) -> Any:
    """``validate_dcp``'s checks of every file, the checksummed ones held open in ``files``
    (for a read that follows); returns the checked metadata (None without ``checksums``)."""
    check_dcp_files(man, files, None if checksums else ())
    if not checksums:
        _check_file(man, METADATA_NAME, False)
        return None
    md = read_dcp_metadata(man)
    _check_items(man, md, files)
    return md


def _opened(man: DCPManifest, files: Optional[CheckedFiles], name: str):
    """``name``'s checked fd: the one ``files`` holds (hashed already), else opened and
    checked now."""
    return open_checked(man, name) if files is None else files.open(name)


def load_trainer(man: DCPManifest, files: Optional[CheckedFiles] = None) -> dict:
    """``trainer.pt``, checked (size, sha256) and loaded with ``weights_only=True`` from
    the same open file (``files``': the one its check hashed)."""
    fpath = man.path / TRAINER_NAME
    with _opened(man, files, TRAINER_NAME) as fd:
        obj = _torch_load_fd(fd, fpath, False)
    if not isinstance(obj, dict) or obj.get("format") != "sharded_ams.trainer" \
            or obj.get("step") != man.step:
        raise CheckpointError(f"{fpath}: not the trainer state of step {man.step}", path=fpath,
                              kind="corrupt")
    return obj


def load_rng(man: DCPManifest, rank: int,
             files: Optional[CheckedFiles] = None) -> Optional[dict]:
    """Rank ``rank``'s RNG states, checked (size, sha256, weights-only load, each state
    settable: ``contents.check_rng``); None when the checkpoint has none for it (saved on
    another world size, or converted by ``ckpt convert``)."""
    name = rng_file_name(rank)
    if name not in man.files:
        return None
    fpath = man.path / name
    with _opened(man, files, name) as fd:
        obj = _torch_load_fd(fd, fpath, False)
    if not isinstance(obj, dict) or obj.get("format") != "sharded_ams.rng" \
            or obj.get("rank") != rank:
        raise CheckpointError(f"{fpath}: not the RNG states of rank {rank}", path=fpath,
                              kind="corrupt")
    check_rng(Rules(fpath, "corrupt"), obj.get("rng"))
    return obj["rng"]


def validate_any(path: PathLike, *, checksums: bool = True, value_report: Optional[list] = None):
    """``validate_checkpoint`` of either format: a DCP checkpoint's :class:`DCPManifest`,
    or the native format's ``Manifest`` (``value_report``: native checkpoints only)."""
    if manifest_format(path) == DCP_FORMAT:
        return validate_dcp(path, checksums=checksums)
    return validate_native(path, checksums=checksums, value_report=value_report)
