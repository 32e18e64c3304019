"""DCP's ``StorageReader`` for a checked checkpoint: ``dcp.load`` reads through it.

torch's ``FileSystemReader`` would unpickle ``.metadata`` again (any callable can run),
open each data file again by name after our checks (a file renamed over since, same name
and size, would be read unchecked; a symlink or FIFO put there would be followed or wait
forever), and ``copy_`` each stored chunk into its destination whatever the chunk's dtype
(a float64 or int item converted silently, where the native format refuses a dtype that
is not the manifest's). This reader returns the checked metadata, reads every item through
the fds the checks hashed (``dcp_meta.CheckedFiles``), reads each item's zip directory
before ``torch.load`` sees it, and refuses a stored chunk that is not a tensor of its
metadata's dtype and chunk shape, naming the item."""

from __future__ import annotations

import io

from typing import Any

import torch
from torch import Tensor
from torch.futures import Future

from .dcp_meta import CheckedFiles, DCPManifest
from .format import CheckpointError
from .validate import _check_zip, _Range
from .values import problem_counts

__all__ = ["reader_of", "dcp_value_report"]


def _chunk_of(md: Any, index: Any) -> tuple[torch.dtype, tuple]:
    """(dtype, sizes) the metadata gives the chunk stored at ``index``."""
    item = md.state_dict_metadata.get(index.fqn)
    offsets = tuple(index.offset or ())
    for c in getattr(item, "chunks", None) or ():
        if tuple(c.offsets) == offsets:
            return item.properties.dtype, tuple(c.sizes)
    raise KeyError(f"{index.fqn!r:.80}: no chunk at {offsets!r:.60} in the metadata")


def _item(man: DCPManifest, fd: int, rel: str, index: Any, info: Any) -> io.BufferedReader:
    """A stream of the item stored at ``index`` (bytes ``info.offset + info.length`` of
    ``rel``, through its checked fd), once its zip directory was read: what torch.load
    then reads allocates no more than the item holds."""
    where = f"item {index.fqn!r:.80}"
    if index.offset is not None:
        where += f" (chunk at {tuple(index.offset)!r:.60})"
    _check_zip(fd, man.path / rel, info.offset, info.length, where)
    return io.BufferedReader(_Range(fd, info.offset, info.length))


def _stored_tensor(man: DCPManifest, md: Any, fd: int, rel: str, index: Any,
                   info: Any) -> Tensor:
    """The chunk stored at ``index``, loaded (weights only) and checked against its
    metadata: a tensor of its dtype and chunk shape."""
    with _item(man, fd, rel, index, info) as f:
        t = torch.load(f, map_location="cpu", weights_only=True)
    dtype, sizes = _chunk_of(md, index)
    if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != sizes:
        got = (f"a {t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, Tensor)
               else f"a {type(t).__name__}")
        fpath = man.path / rel
        raise CheckpointError(f"{fpath}: item {index.fqn!r:.80} (chunk at "
                              f"{tuple(index.offset or ())!r:.60}) holds {got}; the metadata "
                              f"says a {dtype} tensor of shape {list(sizes)}: refused (a load "
                              "would convert it silently)", path=fpath, kind="corrupt",
                              field=index.fqn)
    return t


def _optimized_names(man: DCPManifest, md: Any, files: CheckedFiles) -> list[str]:
    """The params of the saved param groups (their ``params`` items: lists of names)."""
    names: list[str] = []
    for index, info in md.storage_data.items():
        path = md.planner_data.get(index.fqn, ())
        if tuple(path[:2]) == ("optim", "param_groups") and path[-1:] == ("params",):
            with files.open(info.relative_path) as fd, \
                    _item(man, fd, info.relative_path, index, info) as f:
                value = torch.load(f, map_location="cpu", weights_only=True)
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise CheckpointError(f"{man.path / info.relative_path}: item {index.fqn!r:.80} "
                                      "is not a list of param names", path=man.path, kind="corrupt")
            names += value
    return names


def dcp_value_report(man: DCPManifest, md: Any, files: CheckedFiles) -> list[dict]:
    """What ``load_dcp`` would refuse as unsound values (``values.dcp_value_problems``:
    NaN/inf in an optimized param's fp32 master ``model.<param>`` or its state but ``step``,
    a negative ``exp_avg_sq``), read one stored chunk at a time through ``files`` (no
    whole state in memory: ``ckpt inspect`` of any size). One entry per field, counts
    summed over its chunks: ``{"param", "key", "field", "file", "nonfinite", "negative"}``."""
    names = set(_optimized_names(man, md, files))
    fields = {}  # DCP key -> (param, state key), from each item's nesting path
    for key in md.state_dict_metadata:
        path = tuple(md.planner_data.get(key, ()))
        if len(path) == 2 and path[0] == "model" and path[1] in names:
            fields[key] = (path[1], "master")
        elif len(path) == 4 and path[:2] == ("optim", "state") and path[2] in names \
                and path[3] != "step":
            fields[key] = (path[2], path[3])
    out: dict[str, dict] = {}
    by_file: dict[str, list] = {}
    for index, info in md.storage_data.items():
        if index.fqn in fields:
            by_file.setdefault(info.relative_path, []).append((info.offset, index, info))
    for rel in sorted(by_file):
        with files.open(rel) as fd:
            for _, index, info in sorted(by_file[rel], key=lambda t: t[0]):
                param, key = fields[index.fqn]
                nonfinite, negative = problem_counts(
                    _stored_tensor(man, md, fd, rel, index, info), key)
                if nonfinite or negative:
                    p = out.setdefault(index.fqn, {"param": param, "key": key, "field": index.fqn,
                                                   "file": rel, "nonfinite": 0, "negative": 0})
                    p["nonfinite"] += nonfinite
                    p["negative"] += negative
    return list(out.values())


def _read_file(man: DCPManifest, md: Any, files: CheckedFiles, rel: str, reqs: list,
               storage: dict, planner: Any) -> None:
    """Every requested item of the data file ``rel``, in file order, through its checked fd."""
    from torch.distributed.checkpoint.planner import LoadItemType

    with files.open(rel) as fd:
        for req in sorted(reqs, key=lambda r: storage[r.storage_index].offset):
            info = storage[req.storage_index]
            if req.type == LoadItemType.BYTE_IO:  # SafeLoadPlanner loads it, weights only
                with _item(man, fd, rel, req.storage_index, info) as f:
                    planner.load_bytes(req, io.BytesIO(f.read()))
                continue
            t = _stored_tensor(man, md, fd, rel, req.storage_index, info)
            for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                t = t.narrow(dim, start, length)
            target = planner.resolve_tensor(req).detach()
            if target.shape != t.shape:
                raise CheckpointError(f"{man.path / rel}: item {req.storage_index.fqn!r:.80}: "
                                      f"a read of shape {list(t.shape)} into {list(target.shape)}",
                                      path=man.path / rel, kind="corrupt")
            target.copy_(t)
            planner.commit_tensor(req, target)


def reader_of(man: DCPManifest, metadata: Any, files: CheckedFiles):
    """A ``FileSystemReader`` of the checked checkpoint ``man``: ``metadata`` (checked) as
    its metadata, every item read through ``files`` (this module's docstring)."""
    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        def __init__(self) -> None:
            super().__init__(str(man.path))

        def read_metadata(self, *args: Any, **kwargs: Any):
            return metadata

        def read_data(self, plan, planner) -> Future:
            by_file: dict[str, list] = {}
            for req in plan.items:
                by_file.setdefault(self.storage_data[req.storage_index].relative_path,
                                   []).append(req)
            for rel in sorted(by_file):
                _read_file(man, metadata, files, rel, by_file[rel], self.storage_data, planner)
            done: Future = Future()
            done.set_result(None)
            return done

    return _Reader()
