"""DCP checkpoints (``sharded_ams.checkpoint.dcp``) as untrusted input, in one process:
a round trip, the commit rule (no manifest, no checkpoint), the metadata pickle read
through the allowlist (a planted payload never runs), storage outside the listed files,
a different model named, and ``ckpt inspect``. Conversion and RNG states are in
tests/test_dcp_convert.py; training equality and resharding in
tests/test_parallel_launcher.py."""

from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import warnings
import zipfile

import pytest
import torch

from dcp_common import copy_dir, rehash, trained
from sharded_ams.checkpoint import (CheckpointError, find_latest_checkpoint, load_dcp, save_dcp,
                                    validate_checkpoint)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process"
        path = tmp_path_factory.mktemp("dcp") / "step-00000002"
        model, opt = trained()
        save_dcp(path, model, opt, step=2, extra={"run": "x"})
    return path, model, opt


def test_round_trip_and_inspect(saved, tmp_path):
    from launcher.commands.ckpt import inspect_checkpoint

    path, model, opt = saved
    assert validate_checkpoint(path).step == 2
    assert find_latest_checkpoint(path.parent) == path
    fresh, fopt = trained(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = load_dcp(path, fresh, fopt)
    assert res["step"] == 2 and res["extra"] == {"run": "x"}
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(fopt.state[a][k], opt.state[b][k])
    info = inspect_checkpoint(str(path))
    assert info["valid"] and info["format"] == "dcp" and info["step"] == 2
    from launcher.run.resume_checks import check_same_strategy

    check_same_strategy("fsdp", str(path))
    check_same_strategy("zero1", str(path), tp=2)  # zero1 + tp saves and resumes DCP too
    with pytest.raises(ValueError, match=r"is a dcp checkpoint .* ckpt convert .* --to zero1"):
        check_same_strategy("zero1", str(path))
    assert info["num_params"] == 4 and info["state_keys"] == ["exp_avg", "exp_avg_sq"]


def test_no_manifest_is_no_checkpoint(saved, tmp_path):
    path, _, _ = saved
    bad = copy_dir(path, tmp_path / "step-00000009")
    os.unlink(bad / "manifest.json")
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        validate_checkpoint(bad)
    assert find_latest_checkpoint(tmp_path) is None


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_payload_in_the_metadata_never_runs(saved, tmp_path, monkeypatch):
    path, _, _ = saved
    bad = copy_dir(path, tmp_path / "c")
    (bad / ".metadata").write_bytes(pickle.dumps(_Payload()))
    rehash(bad, ".metadata")  # the manifest agrees: only the allowlist stands in the way
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"refused .*posix\.system|os\.system|not part of DCP"):
        validate_checkpoint(bad)
    assert not (tmp_path / "PWNED").exists()


def test_storage_outside_the_listed_files_is_refused(saved, tmp_path):
    from sharded_ams.checkpoint.dcp_meta import _MetadataUnpickler

    path, _, _ = saved
    bad = copy_dir(path, tmp_path / "c")
    with open(bad / ".metadata", "rb") as f:
        md = _MetadataUnpickler(f).load()
    info = next(iter(md.storage_data.values()))
    info.offset = 10 ** 9
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    rehash(bad, ".metadata")
    with pytest.raises(CheckpointError, match="lies outside"):
        validate_checkpoint(bad)


def _planted_metadata(src, dst, edit):
    """A copy of ``src`` whose unpickled ``.metadata`` went through ``edit(md)``, re-pickled
    and re-hashed (the manifest agrees: only the metadata rules stand in the way)."""
    from sharded_ams.checkpoint.dcp_meta import _MetadataUnpickler

    bad = copy_dir(src, dst)
    with open(bad / ".metadata", "rb") as f:
        md = _MetadataUnpickler(f).load()
    edit(md)
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    rehash(bad, ".metadata")
    return bad


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _append_item(path, md, key, payload: bytes, name: str = "__0_0.distcp") -> None:
    """Append ``payload`` to the data file ``name`` and store the item ``key`` (fqn, chunk
    offsets or None) there, the data file re-hashed (the manifest agrees)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    with open(path / name, "ab") as f:
        start = f.seek(0, os.SEEK_END)
        f.write(payload)
    fqn, off = key
    md.storage_data[MetadataIndex(fqn, None if off is None else torch.Size(off))] = \
        _StorageInfo(name, start, len(payload))
    rehash(path, name)


def _split_rows(md, *, overlap: bool, storage: bool = True) -> None:
    """model.0.weight (5 x 4) as two chunks: rows 0-2 and 3-4, or rows 0-2 and 2-3 (the
    same 20 elements in all, row 2 twice and row 4 never)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    item = md.state_dict_metadata["model.0.weight"]
    lo = (2, 0) if overlap else (3, 0)
    item.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([3, 4])),
                   ChunkStorageMetadata(torch.Size(lo), torch.Size([2, 4]))]
    if storage:
        md.storage_data[MetadataIndex("model.0.weight", torch.Size(lo))] = \
            md.storage_data[MetadataIndex("model.0.weight", torch.Size([0, 0]))]


CHUNK_CASES = {  # name: (edit of the metadata, a phrase of the refusal)
    "no-chunks": (lambda md: setattr(md.state_dict_metadata["model.0.weight"], "chunks", []),
                  "its chunks hold 0 elements, the tensor 20"),
    "chunk-twice": (lambda md: md.state_dict_metadata["model.0.weight"].chunks.append(
        md.state_dict_metadata["model.0.weight"].chunks[0]), "hold 40 elements"),
    "overlap": (lambda md: _split_rows(md, overlap=True), "overlap"),
    "no-storage": (lambda md: _split_rows(md, overlap=False, storage=False),
                   "no storage entry"),
    "bytes-no-storage": (lambda md: md.storage_data.pop(next(
        i for i in md.storage_data if i.fqn.startswith("optim.param_groups."))),
        "no storage entry"),
}


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunks_must_tile_each_tensor_exactly_once(saved, tmp_path, case):
    """Chunks that leave elements of a tensor unread (none, one twice, two overlapping,
    one without storage) are refused by name: DCP reads nothing into those elements, so
    consolidate returned ``torch.empty`` memory and load_dcp kept the model's old values."""
    from sharded_ams.checkpoint import consolidate

    path, _, _ = saved
    edit, phrase = CHUNK_CASES[case]
    bad = _planted_metadata(path, tmp_path / "c", edit)
    fresh, fopt = trained(seed=1)
    for call in (validate_checkpoint, consolidate, lambda p: load_dcp(p, fresh, fopt)):
        with pytest.raises(CheckpointError, match=r"\.metadata: .*" + phrase) as ei:
            call(bad)
        assert ei.value.kind == "corrupt"
    # two chunks that do tile it, each stored as DCP stores a chunk, pass and read back
    weight = saved[1][0].weight.detach()
    ok = _planted_metadata(path, tmp_path / "ok", lambda md: (
        _split_rows(md, overlap=False, storage=False),
        _append_item(tmp_path / "ok", md, ("model.0.weight", (0, 0)), _saved(weight[:3])),
        _append_item(tmp_path / "ok", md, ("model.0.weight", (3, 0)), _saved(weight[3:]))))
    validate_checkpoint(ok)
    assert torch.equal(consolidate(ok)["model"]["0.weight"], weight)


def _move(md, path, key: str = "lr") -> None:
    """Give the first param group's ``key`` item the nesting path ``path``."""
    md.planner_data[f"optim.param_groups.0.{key}"] = path


PATH_CASES = {  # name: (edit, a phrase, refused by validate_checkpoint too)
    # the bound itself (10**12 would grow a list until memory runs out if the rule broke)
    "index-2**16": (lambda md: _move(md, ("optim", "param_groups", 1 << 16, "lr")),
                   "is not a non-empty tuple of names and list indices", True),
    "index-neg": (lambda md: _move(md, ("optim", "param_groups", -5, "lr")),
                  "is not a non-empty tuple", True),
    "a-list": (lambda md: _move(md, ["optim", "param_groups", 0, "lr"]), "is not a non-empty", True),
    "empty": (lambda md: _move(md, ()), "is not a non-empty tuple", True),
    "unnamed-item": (lambda md: md.planner_data.pop("model.0.bias"),
                     "do not name exactly the items", True),
    "dtype-a-string": (lambda md: setattr(md.state_dict_metadata["model.0.bias"].properties,
                                          "dtype", "float32"), "is not a torch dtype", True),
    "gap": (lambda md: _move(md, ("optim", "param_groups", 3, "lr")), "are not 0..n-1", False),
    "same-place": (lambda md: _move(md, ("optim", "param_groups", 0, "betas")),
                   "are both at", False),
    "through-an-item": (lambda md: _move(md, ("optim", "param_groups", 0, "betas", "x")),
                        "runs through another item|are both at", False),
    "params-elsewhere": (lambda md: _move(md, ("optim", "param_groups", 0, "params2"), "params"),
                         r"cannot be read \(KeyError: 'params'\)", False),
}


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_metadata_nesting_paths_and_dtypes_are_checked(saved, tmp_path, case, capsys):
    """``.metadata``'s nesting paths (``planner_data``) and dtypes are untrusted: an index
    of 10**12 grew a list until memory ran out, -5 was a raw IndexError, a path of the
    wrong kind a traceback. Each is a CheckpointError naming .metadata (or the checkpoint),
    and ``ckpt consolidate``/``convert`` refuse it in one line (exit 2)."""
    from launcher.commands.ckpt import main
    from sharded_ams.checkpoint import consolidate
    from sharded_ams.checkpoint.convert import to_zero1

    path, _, _ = saved
    edit, phrase, at_validate = PATH_CASES[case]
    bad = _planted_metadata(path, tmp_path / "c", edit)
    calls = [consolidate, lambda p: to_zero1(p, tmp_path / "z")]
    if at_validate:
        calls.append(validate_checkpoint)
    else:
        validate_checkpoint(bad)  # each item's own metadata is sound: refused when assembled
    for call in calls:
        with pytest.raises(CheckpointError, match=phrase) as ei:
            call(bad)
        assert ei.value.kind == "corrupt" and ei.value.path in (bad, bad / ".metadata")
    for args in (["consolidate", str(bad), str(tmp_path / "full.pt")],
                 ["convert", str(bad), str(tmp_path / "z1"), "--to", "zero1"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err, err


def _storage(md, fqn):
    return next(v for i, v in md.storage_data.items() if i.fqn == fqn)


def _share(md, fqn, other, shift: int = 0) -> None:
    """``fqn``'s storage at ``other``'s bytes (``shift`` bytes on: its own length kept)."""
    mine, theirs = _storage(md, fqn), _storage(md, other)
    mine.offset, mine.length = theirs.offset + shift, mine.length if shift else theirs.length


def _transform(descriptors):
    return lambda md: setattr(_storage(md, "model.2.bias"), "transform_descriptors", descriptors)


STORAGE_CASES = {  # name: (edit of the metadata, a phrase of the refusal)
    # the weights read back as exp_avg_sq, silently (accepted by every reader before)
    "same-bytes": (lambda md: _share(md, "optim.state.0.weight.exp_avg_sq", "model.0.weight"),
                   "overlaps that of 'model.0.weight'"),
    "bytes-in-another": (lambda md: _share(md, "optim.state.0.bias.exp_avg", "model.0.bias", 100),
                         "overlaps that of 'model.0.bias'"),
    # DCP's stream transforms (zstd: a decompression bomb where zstandard is installed)
    "zstd": (_transform(["stream.zstd/1"]), r"stream transforms \['stream\.zstd/1'\]"),
    "unknown": (_transform(("evil/1",)), "stream transforms"),
    "not-a-list": (_transform("stream.zstd/1"), "stream transforms"),
}


@pytest.mark.parametrize("case", list(STORAGE_CASES))
def test_items_have_bytes_of_their_own_and_no_transforms(saved, tmp_path, case):
    """Two items over the same bytes (one read as the other), or an item with a stream
    transform (none is written; DCP's zstd inflates without bound), are refused from the
    metadata by every reader (before: a silent load or DCP's raw CheckpointException)."""
    from sharded_ams.checkpoint import consolidate

    path, _, _ = saved
    edit, phrase = STORAGE_CASES[case]
    bad = _planted_metadata(path, tmp_path / "c", edit)
    fresh, fopt = trained(seed=1)
    for call in (validate_checkpoint, consolidate, lambda p: load_dcp(p, fresh, fopt)):
        with pytest.raises(CheckpointError, match=r"\.metadata: storage of .*" + phrase) as ei:
            call(bad)
        assert ei.value.kind == "corrupt"


def _deflated(payload: bytes) -> bytes:
    """The same zip with every record DEFLATE-compressed (torch.load inflates them)."""
    src, out = zipfile.ZipFile(io.BytesIO(payload)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name in src.namelist():
            z.writestr(name, src.read(name))
    return out.getvalue()


def _claims_huge(payload: bytes) -> bytes:
    """The same stored zip, each record claiming 1 GiB in the central directory."""
    data, at = bytearray(payload), 0
    while (at := data.find(b"PK\x01\x02", at + 1)) > 0:
        struct.pack_into("<II", data, at + 20, 1 << 30, 1 << 30)  # compressed, uncompressed
    return bytes(data)


ZIP_CASES = {  # name: (the item, its new bytes, a phrase of the refusal)
    # 16 MiB of zeros in 16 KB: any ratio to 1000:1 (a bomb of the file's size x 1000)
    "bytes-deflated": (("optim.param_groups.0.lr", None),
                       lambda: _deflated(_saved(torch.zeros(16 << 20, dtype=torch.uint8))),
                       "is compressed"),
    "tensor-deflated": (("model.2.bias", (0,)),
                        lambda: _deflated(_saved(torch.zeros(4 << 20))), "is compressed"),
    "bytes-claims-1GiB": (("optim.param_groups.0.lr", None),
                          lambda: _claims_huge(_saved(torch.zeros(64))), "claim .* more than"),
    "not-a-zip": (("model.2.bias", (0,)), lambda: b"\0" * 64, "not a torch.save zip"),
}


@pytest.mark.parametrize("case", list(ZIP_CASES))
def test_items_that_would_inflate_are_refused_unread(saved, tmp_path, case, capsys):
    """Each item of a data file goes to ``torch.load``, which inflates DEFLATE records: its
    zip directory is checked first, as the native format's files are (records stored,
    summing to at most its length). Before: valid, and 400 MiB from a 0.4 MB item."""
    from launcher.commands.ckpt import main
    from sharded_ams.checkpoint import consolidate

    path, _, _ = saved
    key, payload, phrase = ZIP_CASES[case]
    bad = _planted_metadata(path, tmp_path / "c",
                            lambda md: _append_item(tmp_path / "c", md, key, payload()))
    fresh, fopt = trained(seed=1)
    for call in (validate_checkpoint, consolidate, lambda p: load_dcp(p, fresh, fopt)):
        with pytest.raises(CheckpointError, match=rf"__0_0\.distcp: item '{key[0]}' .*{phrase}"):
            call(bad)
    assert main(["inspect", str(bad)]) == 1 and "INVALID" in capsys.readouterr().out


def test_dcp_read_failures_are_refusals(saved, tmp_path, capsys):
    """DCP's own read errors (CheckpointException: a BaseException, which ``refusing`` let
    through as a traceback; here a pickle claiming 64 GiB for a 4-byte record, which torch
    refuses unallocated) are CheckpointErrors, and ``ckpt consolidate`` exits 2."""
    from launcher.commands.ckpt import main
    from sharded_ams.checkpoint import consolidate
    from sharded_ams.checkpoint.convert import to_zero1
    src = zipfile.ZipFile(io.BytesIO(_saved(torch.zeros(4, dtype=torch.uint8))))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name in src.namelist():
            b = src.read(name)
            if name.endswith("data.pkl"):  # the storage's numel, BININT1 4 -> LONG1 2**36
                at = b.index(b"K\x04", b.index(b"cpu"))
                b = b[:at] + b"\x8a\x08" + (1 << 36).to_bytes(8, "little") + b[at + 2:]
            z.writestr(name, b)
    bad = _planted_metadata(saved[0], tmp_path / "c", lambda md: _append_item(
        tmp_path / "c", md, ("model.2.bias", (0,)), out.getvalue()))
    fresh, fopt = trained(seed=1)
    for call in (consolidate, lambda p: to_zero1(p, tmp_path / "z"),
                 lambda p: load_dcp(p, fresh, fopt)):
        with pytest.raises(CheckpointError, match=r"c: cannot be read \(RuntimeError: ") as ei:
            call(bad)
        assert ei.value.path == bad
    assert main(["consolidate", str(bad), str(tmp_path / "full.pt")]) == 2
    assert "Traceback" not in capsys.readouterr().err


STORED_CASES = {  # name: (what model.2.bias (1 float32) is stored as, the refusal's phrase)
    "float64": (torch.tensor([0.25], dtype=torch.float64), r"a torch\.float64 tensor of shape \[1\]"),
    "int": (torch.tensor([7], dtype=torch.int32), r"a torch\.int32 tensor of shape \[1\]"),
    "shape": (torch.zeros(1, 1), r"a torch\.float32 tensor of shape \[1, 1\]"),
    "not-a-tensor": ({"x": 1}, "a dict"),
}


@pytest.mark.parametrize("case", list(STORED_CASES))
def test_a_stored_chunk_of_another_dtype_or_shape_is_refused(saved, tmp_path, case):
    """The metadata says model.2.bias is a float32 [1]; its bytes hold something else.
    DCP's reader ``copy_``'d a float64 or int chunk into the float32 param, converted
    silently (the native format refuses a dtype that is not its manifest's); every
    reader now refuses it, naming the item and both dtypes and shapes."""
    from sharded_ams.checkpoint import consolidate

    stored, phrase = STORED_CASES[case]
    bad = _planted_metadata(saved[0], tmp_path / "c", lambda md: _append_item(
        tmp_path / "c", md, ("model.2.bias", (0,)), _saved(stored)))
    fresh, fopt = trained(seed=1)
    for call in (consolidate, lambda p: load_dcp(p, fresh, fopt)):
        with pytest.raises(CheckpointError, match=r"__0_0\.distcp: item 'model\.2\.bias' "
                           r"\(chunk at \(0,\)\) holds " + phrase + r"; the metadata says "
                           r"a torch\.float32 tensor of shape \[1\]") as ei:
            call(bad)
        assert (ei.value.kind, ei.value.field) == ("corrupt", "model.2.bias")


@pytest.mark.parametrize("victim", [".metadata", "trainer.pt", "rng-rank00000.pt",
                                    "__0_0.distcp"])
def test_a_file_replaced_right_after_its_checksum_is_not_read(saved, tmp_path, monkeypatch,
                                                             victim):
    """Each file is read through the fd its sha256 was taken on. Before, ``.metadata``,
    ``trainer.pt`` and the RNG states were hashed on one open and read on another, by
    name: bytes renamed over the file in between (here random ones of the same size,
    the moment its check returns) were what got unpickled or loaded."""
    import contextlib

    from sharded_ams.checkpoint import consolidate
    from sharded_ams.checkpoint import dcp_meta

    real, swapped = dcp_meta.open_checked, set()

    @contextlib.contextmanager
    def checked_then_replaced(man, name, *, checksum=True):
        with real(man, name, checksum=checksum) as fd:
            if name == victim and checksum and man.path not in swapped:
                swapped.add(man.path)
                target = man.path / name
                other = target.with_name("replacement")
                other.write_bytes(os.urandom(target.stat().st_size))
                os.replace(other, target)
            yield fd

    monkeypatch.setattr(dcp_meta, "open_checked", checked_then_replaced)
    want = saved[1].state_dict()
    calls = [] if victim.startswith("rng") else [lambda p: consolidate(p)["model"]]
    for i, call in enumerate(calls + [None]):
        path = copy_dir(saved[0], tmp_path / f"c{i}")
        if call is None:
            model, opt = trained(seed=1)
            assert load_dcp(path, model, opt)["step"] == 2
            got = model.state_dict()
        else:
            got = call(path)
        assert path in swapped
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("held", [True, False], ids=["held", "over-the-fd-cap"])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "same-size-content"])
def test_a_data_file_swapped_after_the_checks_is_not_followed(saved, tmp_path, monkeypatch,
                                                              kind, held):
    """DCP's own reader opens the data files again by name after the checks: one made a
    symlink since (to a copy outside: read through it, silently), a FIFO (the read hung)
    or a same-size file of other bytes renamed over it (read unchecked) was followed. Ours
    reads through the fds the checks hashed (``CheckedFiles``): the checked bytes load,
    whatever the name points at now. Past the cap on held fds a file is opened again at the
    read and checked again: the swap is refused."""
    from sharded_ams.checkpoint import consolidate
    import sharded_ams.checkpoint.dcp as dcp_mod
    import sharded_ams.checkpoint.dcp_read as dcp_read
    from sharded_ams.checkpoint.dcp_meta import CheckedFiles

    if not held:
        monkeypatch.setattr(CheckedFiles, "MAX_HELD", 0)
    path = copy_dir(saved[0], tmp_path / "c")

    def swap(man, *a, _load=dcp_read.load_trainer):  # after the checks, before dcp.load
        if data.is_file() and not data.is_symlink():
            outside = tmp_path / "outside.distcp"
            raw = bytearray(data.read_bytes())
            if kind == "same-size-content":  # a weight's stored float changed, size kept
                at = raw.find(want["2.weight"].numpy().tobytes())
                assert at > 0
                raw[at + 1] ^= 0x40
                outside.write_bytes(bytes(raw))
                os.replace(outside, data)
            else:
                outside.write_bytes(bytes(raw))
                data.unlink()
                data.symlink_to(outside) if kind == "symlink" else os.mkfifo(data)
        return _load(man, *a)

    monkeypatch.setattr(dcp_read, "load_trainer", swap)
    monkeypatch.setattr(dcp_mod, "load_trainer", swap)
    want = saved[1].state_dict()
    phrase, why = {"symlink": ("is a symbolic link", "unsafe"), "fifo": ("is a FIFO", "unsafe"),
                   "same-size-content": ("sha256 checksum mismatch", "corrupt")}[kind]
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung")))
    signal.alarm(20)  # a read that waits on the FIFO fails the test, not hangs it
    try:
        for i in range(2):
            path = path if not i else copy_dir(saved[0], tmp_path / "d")  # the swap again
            data = path / "__0_0.distcp"
            model, opt = trained(seed=1)
            call = consolidate if i == 0 else (lambda p: load_dcp(p, model, opt))
            if held:
                out = call(path)
                got = out["model"] if i == 0 else model.state_dict()
                assert data.is_symlink() or not data.is_file() or kind == "same-size-content"
                assert all(torch.equal(got[k], want[k]) for k in want)
                continue
            with pytest.raises(CheckpointError, match=rf"__0_0\.distcp: {phrase}") as ei:
                call(path)
            assert ei.value.kind == why
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_different_model_is_named(saved):
    path, _, _ = saved
    other, oopt = trained(width=6)
    with pytest.raises(CheckpointError, match=r"different model.*\(6, 4\)"):
        load_dcp(path, other, oopt)
