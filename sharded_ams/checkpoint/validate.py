"""Every rule a checkpoint directory must pass before anything in it is used.

A checkpoint is input from disk: it may be damaged, hand-edited or planted. So:

1. **Files.** Every file is opened with ``O_NOFOLLOW | O_NONBLOCK`` and ``fstat``-ed: a
   symlink, FIFO, device or directory is refused before a byte is read (no hang on a FIFO
   or ``/dev/zero``, nothing read from outside the directory). Its size must equal the
   manifest's, and its sha256 too (``checksums=True``); a file is then loaded from that
   same open file (``torch.load(weights_only=True)``), never re-opened by name, and only
   if its zip records are stored uncompressed (``_check_zip``: no zip bomb).
2. **The manifest** (at most ``MAX_MANIFEST_BYTES``, and nested at most ``MAX_JSON_DEPTH``
   levels deep, measured before it is parsed: ``jsonread.py``) is JSON whose every field
   is checked for type (before any lookup: a list is no dict key) and range, and every
   number against the others and the files' real sizes, before anything is allocated
   from it (``read_manifest``): the shard entries are exactly ``world_size`` files named
   for their ranks; each piece is ``[name, offset, length]``, never empty, at most one
   per param in a file (``_check_pieces`` says why a save never writes more); the pieces
   of all shards tile every param exactly once; ``numel`` is the
   product of ``shape``; a shard file is large enough for the elements it claims; dtypes
   and state keys come from fixed lists; the hyperparameters pass the optimizer
   constructor's checks (``sharded_ams.config.validate_hparams``).
3. **File contents** (``contents.py``): what a file holds must agree with its
   manifest entry: the same pieces, one 1-D tensor of the right length and dtype per state
   key, the same param groups and hyperparameters (so what ``inspect`` shows is what a
   load applies), valid RNG states.

Typed reads that name the file and field are ``rules.py``'s. The *values* (NaN/inf,
negative second moments) are not a rule of validity but of loading: ``values.py``.

Every refusal is a :class:`CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .contents import check_model_extra, check_shard, check_trainer
from .format import (FORMAT, FORMAT_VERSION, MANIFEST_NAME, MODEL_EXTRA_NAME, PARAM_DTYPES,
                     REQUIRED_STATE_KEYS, SHARD_RE, STATE_KEYS, TRAINER_NAME, CheckpointError,
                     Manifest, PathLike, prod, shard_file_name)
from .jsonread import MAX_MANIFEST_BYTES, parse_json
from .rules import Rules, check_hparams
from .values import shard_value_problems

__all__ = ["read_manifest", "validate_checkpoint", "open_checked", "load_checked",
           "check_shard", "check_trainer", "check_model_extra", "MAX_MANIFEST_BYTES"]

_MAX_DIMS = 64
_HASH_CHUNK = 16 << 20
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
_HEX = frozenset("0123456789abcdef")
_FILE_KINDS = {MODEL_EXTRA_NAME: "model-extra", TRAINER_NAME: "trainer"}


# ---------------------------------------------------------------------------- files
def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "not a regular file"


@contextlib.contextmanager
def open_regular(fpath: Path, *, max_size: Optional[int] = None) -> Iterator[tuple[int, int]]:
    """Yield ``(fd, size)`` of ``fpath`` if it is a regular file (not a symlink, FIFO,
    device...); never blocks. CheckpointError otherwise."""
    try:
        fd = os.open(fpath, _OPEN_FLAGS)
    except FileNotFoundError:
        raise CheckpointError(f"{fpath}: missing file (listed in the manifest)", path=fpath,
                              kind="missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{fpath}: is a symbolic link; refused (a checkpoint holds "
                                  "only regular files)", path=fpath, kind="unsafe") from None
        raise CheckpointError(f"{fpath}: cannot open ({exc.strerror})", path=fpath,
                              kind="missing") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{fpath}: is {_file_kind(st.st_mode)}, not a regular file; "
                                  "refused", path=fpath, kind="unsafe")
        if max_size is not None and st.st_size > max_size:
            raise CheckpointError(f"{fpath}: {st.st_size} bytes, more than the {max_size} a "
                                  "valid one can have", path=fpath, kind="format")
        yield fd, st.st_size
    finally:
        os.close(fd)


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(fd, _HASH_CHUNK)
        if not chunk:
            break
        h.update(chunk)
    os.lseek(fd, 0, os.SEEK_SET)
    return h.hexdigest()


@contextlib.contextmanager
def open_checked(man: Manifest, name: str, *, checksum: bool = True) -> Iterator[int]:
    """Yield an fd of ``name`` once it is a regular file with the manifest's size (and
    sha256): whatever is later read from this fd is what was checked."""
    entry = man.files[name]
    fpath = man.path / name
    with open_regular(fpath) as (fd, size):
        if size != entry["size"]:
            raise CheckpointError(f"{fpath}: size is {size} bytes, the manifest says "
                                  f"{entry['size']} (truncated or corrupt)", path=fpath,
                                  kind="corrupt", field="size")
        if checksum:
            digest = _sha256_fd(fd)
            if digest != entry["sha256"]:
                raise CheckpointError(
                    f"{fpath}: sha256 checksum mismatch (file {digest[:12]}..., manifest "
                    f"{entry['sha256'][:12]}...): the file is corrupt", path=fpath,
                    kind="corrupt", field="sha256")
        yield fd


class _Range(io.RawIOBase):
    """Bytes ``[start, start + length)`` of the open file ``fd``, read with ``os.pread``
    (the fd's own offset is left alone): what ``zipfile`` needs to read one zip that is a
    range of a larger file (a DCP data file's item)."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self._fd, self._start, self._len, self._pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, "seek before the start")
        self._pos = base + pos
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._len - self._pos))
        if not n:
            return 0
        if hasattr(os, "preadv"):  # straight into the caller's buffer (a tensor's bytes)
            got = os.preadv(self._fd, [memoryview(buf).cast("B")[:n]], self._start + self._pos)
        else:
            data = os.pread(self._fd, n, self._start + self._pos)
            got = len(data)
            buf[:got] = data
        self._pos += got
        return got


def _check_zip(fd: int, fpath: Path, start: int = 0, length: Optional[int] = None,
               what: str = "") -> None:
    """Refuse a file (or the range ``[start, start + length)`` of it: ``what`` names it,
    e.g. a DCP item) whose zip records are compressed, before ``torch.load`` sees it.

    ``torch.save`` writes every record stored (uncompressed), but ``torch.load`` inflates
    DEFLATE records too: a 0.5 MB file could allocate 512 MiB (a zip bomb), and the size
    checked against the manifest would bound nothing. So the central directory is read
    from the same fd (``zipfile``: sizes only, nothing is inflated): every record stored,
    their sizes summing to at most the file's (the range's)."""
    size = os.fstat(fd).st_size if length is None else length
    where = f"{fpath}: {what}" if what else f"{fpath}:"
    try:
        with zipfile.ZipFile(_Range(fd, start, size)) as z:
            infos = z.infolist()
    except Exception as exc:  # noqa: BLE001 - not a zip: not something torch.save wrote
        raise CheckpointError(f"{where} cannot be loaded: not a torch.save zip file "
                              f"({type(exc).__name__}: {exc})", path=fpath,
                              kind="corrupt") from None
    for i in infos:
        if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size:
            raise CheckpointError(f"{where} zip record {i.filename!r:.80} is compressed "
                                  f"({i.compress_size} -> {i.file_size} bytes); torch.save "
                                  "never compresses: refused unread", path=fpath,
                                  kind="corrupt")
    total = sum(i.file_size for i in infos)
    if total > size:
        raise CheckpointError(f"{where} its zip records claim {total} bytes, more than the "
                              f"{'file' if length is None else 'item'}'s {size}: refused "
                              "unread", path=fpath, kind="corrupt")


def _torch_load_fd(fd: int, fpath: Path, mmap: bool) -> Any:
    """``torch.load(weights_only=True)`` of the open file ``fd``, once its zip records are
    known to be stored (:func:`_check_zip`): it allocates no more than the file holds."""
    _check_zip(fd, fpath)
    try:
        if mmap and os.path.isdir("/proc/self/fd"):
            # the same open file (not the name again): map it instead of reading it
            return torch.load(f"/proc/self/fd/{fd}", map_location="cpu", weights_only=True,
                              mmap=True)
        with os.fdopen(os.dup(fd), "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{fpath}: cannot be loaded ({type(exc).__name__}: {exc})",
                              path=fpath, kind="corrupt") from exc


def load_checked(man: Manifest, name: str, *, checksum: bool = True, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` of a checked file, then its content checked
    against the manifest (shards, trainer.pt, model-extra.pt)."""
    with open_checked(man, name, checksum=checksum) as fd:
        obj = _torch_load_fd(fd, man.path / name, mmap)
    check = {TRAINER_NAME: check_trainer, MODEL_EXTRA_NAME: check_model_extra}.get(name)
    try:
        check(man, obj) if check is not None else check_shard(man, name, obj)
    except CheckpointError:
        raise
    except Exception as exc:  # a value of a type no rule expected: still a refusal
        fpath = man.path / name
        raise CheckpointError(f"{fpath}: malformed content ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})", path=fpath,
                              kind="corrupt") from exc
    return obj


# ---------------------------------------------------------------------------- manifest
def _read_json(mpath: Path) -> dict:
    with open_regular(mpath, max_size=MAX_MANIFEST_BYTES) as (fd, size):
        data = os.read(fd, size + 1)
    d = parse_json(data, mpath)  # size and nesting bounded: never a RecursionError
    if not isinstance(d, dict):
        raise CheckpointError(f"{mpath}: corrupt manifest (not a JSON object)", path=mpath,
                              kind="format")
    return d


def read_step(path: Path) -> Optional[int]:
    """The manifest's step, or None if there is none / it is unreadable (for ordering)."""
    try:
        step = _read_json(path / MANIFEST_NAME).get("step")
    except CheckpointError:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def read_manifest(path: PathLike) -> Manifest:
    """Parse ``path/manifest.json`` and check every rule of the manifest (section 2 of
    this module's docstring). No other file is opened; nothing is allocated from an
    unchecked number."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not path.is_dir():
        what = "not a directory" if os.path.lexists(path) else "no such checkpoint directory"
        raise CheckpointError(f"{path}: {what}", path=path, kind="missing")
    if not os.path.lexists(mpath):
        raise CheckpointError(f"{path}: not a committed checkpoint (no {MANIFEST_NAME}; "
                              "the save did not finish)", path=mpath, kind="uncommitted")
    d = _read_json(mpath)
    try:
        return _manifest_from(d, path, Rules(mpath))
    except CheckpointError as exc:
        err = exc
    except Exception as exc:  # a rule forgotten above: still a refusal the scans skip past
        err = CheckpointError(f"{mpath}: malformed manifest ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})", path=mpath, kind="format")
    # raised without the frames that hold the parsed JSON (up to MAX_MANIFEST_BYTES of
    # lists), so that it is freed now, not when the caller's handler ends
    del d
    raise err.with_traceback(None)


def _manifest_from(d: dict, path: Path, r: Rules) -> Manifest:
    """The Manifest of the parsed JSON ``d``, every field checked first."""
    if d.get("format") != FORMAT:
        raise r.fail("format", f"{d.get('format')!r:.60}, expected {FORMAT!r}")
    version = r.int_(r.get(d, "version", ""), "version", 1)
    if version > FORMAT_VERSION:
        raise r.fail("version", f"{version} is newer than this code reads ({FORMAT_VERSION})")
    step = r.int_(r.get(d, "step", ""), "step")
    world = r.int_(r.get(d, "world_size", ""), "world_size", 1)
    opt = _check_optimizer(r, r.dict_(r.get(d, "optimizer", ""), "optimizer"))
    params = _check_params(r, r.dict_(r.get(d, "params", ""), "params"), opt["param_groups"])
    files = r.dict_(r.get(d, "files", ""), "files")
    model = d.get("model")
    if model is not None:
        model = _check_model(r, model, params, files)
    _check_files(r, files, world, params, opt["state_keys"])
    created_unix = d.get("created_unix", 0.0)
    if isinstance(created_unix, bool) or not isinstance(created_unix, (int, float)):
        raise r.fail("created_unix", f"expected a number, got {created_unix!r:.60}")
    for key in ("created", "torch_version", "sharded_ams_version"):
        r.str_(d.get(key, ""), key)
    return Manifest(path=path, step=step, world_size=world, params=params, optimizer=opt,
                    files=files, model=model, created=d.get("created", ""),
                    created_unix=float(created_unix), format=FORMAT, version=version,
                    torch_version=d.get("torch_version", ""),
                    sharded_ams_version=d.get("sharded_ams_version", ""), raw=d)


def _check_optimizer(r: Rules, opt: dict) -> dict:
    r.str_(r.get(opt, "class", "optimizer"), "optimizer.class")
    keys = r.list_(r.get(opt, "state_keys", "optimizer"), "optimizer.state_keys")
    for i, k in enumerate(keys):
        if k not in STATE_KEYS:
            raise r.fail(f"optimizer.state_keys[{i}]", f"unknown state {k!r:.60} "
                         f"(known: {', '.join(STATE_KEYS)})")
    if len(set(keys)) != len(keys) or not set(REQUIRED_STATE_KEYS) <= set(keys):
        raise r.fail("optimizer.state_keys", f"{keys} must be distinct and hold "
                     f"{', '.join(REQUIRED_STATE_KEYS)}")
    groups = r.list_(r.get(opt, "param_groups", "optimizer"), "optimizer.param_groups")
    if not groups:
        raise r.fail("optimizer.param_groups", "empty")
    for i, g in enumerate(groups):
        where = f"optimizer.param_groups[{i}]"
        r.dict_(g, where)
        check_hparams(r, g, where)
        for j, n in enumerate(r.list_(r.get(g, "params", where), f"{where}.params")):
            r.name(n, f"{where}.params[{j}]")
    r.int_(opt.get("skipped_steps", 0), "optimizer.skipped_steps")
    return opt


def _check_params(r: Rules, params: dict, groups: list[dict]) -> dict:
    group_of: dict[str, int] = {}
    for gi, g in enumerate(groups):
        for n in g["params"]:
            if n in group_of:
                raise r.fail(f"optimizer.param_groups[{gi}].params", f"param {n!r} listed twice")
            group_of[n] = gi
    for n, info in params.items():
        where = f"params[{n!r:.80}]"
        r.name(n, where)
        r.dict_(info, where)
        shape = r.list_(r.get(info, "shape", where), f"{where}.shape")
        if len(shape) > _MAX_DIMS:
            raise r.fail(f"{where}.shape", f"{len(shape)} dimensions")
        for i, s in enumerate(shape):
            r.int_(s, f"{where}.shape[{i}]")
        numel = r.int_(r.get(info, "numel", where), f"{where}.numel")
        if numel != prod(shape):
            raise r.fail(f"{where}.numel", f"{numel} is not the product of shape {shape} "
                         f"({prod(shape)})")
        dtype = r.get(info, "dtype", where)
        if not isinstance(dtype, str) or dtype not in PARAM_DTYPES:
            raise r.fail(f"{where}.dtype", f"{dtype!r:.60} is not one of {sorted(PARAM_DTYPES)}")
        gi = r.int_(r.get(info, "group", where), f"{where}.group", 0, len(groups) - 1)
        if group_of.get(n) != gi:
            raise r.fail(f"{where}.group", f"{gi}, but param group {group_of.get(n)} lists it")
    if set(group_of) != set(params):
        extra = sorted(set(group_of) - set(params))[:5]
        raise r.fail("params", f"param groups list params without an entry: {extra}")
    return params


def _check_model(r: Rules, model: Any, params: dict, files: dict) -> dict:
    keys = r.dict_(r.get(r.dict_(model, "model"), "keys", "model"), "model.keys")
    extra = False
    for k, info in keys.items():
        where = f"model.keys[{k!r:.80}]"
        r.name(k, where)
        r.dict_(info, where)
        if "param" in info:
            if r.name(info["param"], f"{where}.param") not in params:
                raise r.fail(f"{where}.param", f"{info['param']!r:.80} is not a saved param")
        elif info.get("extra") is True:
            extra = True
            if "shape" in info:
                for i, s in enumerate(r.list_(info["shape"], f"{where}.shape")):
                    r.int_(s, f"{where}.shape[{i}]")
        else:
            raise r.fail(where, "neither a param nor extra state")
    if extra and MODEL_EXTRA_NAME not in files:
        raise r.fail("files", f"{MODEL_EXTRA_NAME} is not listed, but model.keys has extra state")
    return model


def _check_files(r: Rules, files: dict, world: int, params: dict, state_keys: list) -> None:
    """File entries, the shard set, the piece tiling and the sizes the pieces need."""
    ranks: dict[int, str] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {n: [] for n in params}
    # the least bytes one element costs in a shard: an fp32 master, the rest at least bf16
    min_bytes = 4 + 2 * (len(state_keys) - 1)
    for name, entry in files.items():
        where = f"files[{name!r:.80}]"
        r.name(name, where)
        r.dict_(entry, where)
        size = r.int_(r.get(entry, "size", where), f"{where}.size")
        sha = r.str_(r.get(entry, "sha256", where), f"{where}.sha256")
        if len(sha) != 64 or not set(sha) <= _HEX:
            raise r.fail(f"{where}.sha256", f"{sha!r:.80} is not a sha256 hex digest")
        m = SHARD_RE.match(name)
        kind = "shard" if m else _FILE_KINDS.get(name)
        if kind is None:
            raise r.fail(where, "not a file name this format uses")
        if entry.get("kind") != kind:
            raise r.fail(f"{where}.kind", f"{entry.get('kind')!r:.60}, expected {kind!r}")
        if not m:
            continue
        rank, of = int(m.group(1)), int(m.group(2))
        if of != world or rank >= world:
            raise r.fail(where, f"a shard of rank {rank} of {of}; the checkpoint has "
                         f"world_size {world}")
        if r.int_(r.get(entry, "rank", where), f"{where}.rank") != rank:
            raise r.fail(f"{where}.rank", f"{entry['rank']}, but the file name says {rank}")
        ranks[rank] = name
        elems = _check_pieces(r, r.get(entry, "pieces", where), f"{where}.pieces", name,
                              params, spans)
        if elems * min_bytes > size:
            raise r.fail(f"{where}.size", f"{size} bytes cannot hold the {elems} elements "
                         f"its pieces claim ({min_bytes} bytes each at least)")
    if len(ranks) != world:
        missing = [shard_file_name(q, world) for q in range(world) if q not in ranks][:3]
        raise r.fail("files", f"world_size is {world} but {len(ranks)} shard files are listed "
                     f"(missing e.g. {missing})")
    for pname, iv in spans.items():
        pos = 0
        for a, b, fname in sorted(iv):
            if a != pos:
                how = "overlap another file's" if a < pos else "leave a gap"
                raise r.fail(f"files[{fname!r}].pieces", f"param {pname!r:.80}: the pieces "
                             f"{how} at element {min(a, pos)}: they must tile [0, numel) "
                             "exactly once")
            pos = b
        if pos != params[pname]["numel"]:
            raise r.fail("files", f"param {pname!r:.80}: the pieces cover {pos} of "
                         f"{params[pname]['numel']} elements")


def _check_pieces(r: Rules, pieces: Any, where: str, fname: str, params: dict,
                  spans: dict[str, list[tuple[int, int, str]]]) -> int:
    """One shard entry's pieces, into ``spans``; returns the elements they claim.

    A save writes, per shard file, at most one piece per param, never an empty one: a
    param is one contiguous span of one bucket, a rank owns one contiguous span of each
    bucket, and their intersection is one interval (``BufferLayout.pieces`` skips the
    empty ones). So a file lists at most ``len(params)`` pieces, all ``world_size`` files
    at most ``len(params) x world_size``: that bound is checked before any piece is
    looked at, and so no manifest of a few MB can make the checks (or a load) walk
    millions of pieces that hold nothing."""
    pieces = r.list_(pieces, where)
    if len(pieces) > len(params):
        raise r.fail(where, f"{len(pieces)} pieces for {len(params)} params (a save writes "
                     "at most one piece per param per shard file)")
    seen: set[str] = set()
    elems = 0
    for i, pc in enumerate(pieces):
        pw = f"{where}[{i}]"
        pname, off, length = r.list_(pc, pw, 3)
        pname = r.name(pname, f"{pw}[0] (name)")
        if pname not in params:
            raise r.fail(pw, f"unknown param {pname!r:.80}")
        if pname in seen:
            raise r.fail(pw, f"a second piece of param {pname!r:.80} in this file (a save "
                         "writes at most one piece per param per shard file)")
        seen.add(pname)
        numel = params[pname]["numel"]
        off = r.int_(off, f"{pw}[1] (offset)", 0, numel)
        if off == numel:
            raise r.fail(f"{pw}[1] (offset)", f"{off} leaves no element of param "
                         f"{pname!r:.80} ({numel} elements): a piece is never empty")
        length = r.int_(length, f"{pw}[2] (length)", 0, numel - off)
        if length == 0:
            raise r.fail(f"{pw}[2] (length)", "0: a piece is never empty (a save skips them)")
        spans[pname].append((off, off + length, fname))
        elems += length
    return elems


# ---------------------------------------------------------------------------- all of it
def validate_checkpoint(path: PathLike, *, checksums: bool = True,
                        value_report: Optional[list] = None) -> Manifest:
    """Check that ``path`` is a committed, intact checkpoint and return its manifest.

    Checks every rule of this module: the manifest's; every listed file is a regular file
    with the listed size; with ``checksums`` (the default) also every file's sha256 and
    content (each file is loaded, memory-mapped, and compared with its manifest entry).
    ``checksums=False`` reads only the manifest and ``fstat``s the files (fast).
    Raises :class:`CheckpointError` naming the file (and field) otherwise.

    The values are not a rule here (a diverged run's checkpoint is intact: retention
    and the scans treat it as such; loads refuse it, see ``values.py``). With
    ``checksums``, a ``value_report`` list receives every piece holding NaN/inf or a
    negative ``exp_avg_sq``, found in the same pass (``ckpt inspect`` shows them).
    """
    man = read_manifest(path)
    for name in man.files:
        if checksums:
            obj = load_checked(man, name, checksum=True, mmap=True)
            if value_report is not None and SHARD_RE.match(name):
                value_report.extend(shard_value_problems(man, name, obj))
        else:
            with open_checked(man, name, checksum=False):
                pass
    return man
