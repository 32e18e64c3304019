"""prepare-data and the token shards under careless or hostile input (issue 23): nothing
outside OUT is deleted, damaged input is a one-line error naming the file, ids never wrap
and are range-checked, memory stays bounded, and the tests that let bugs through."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.cli import main as cli_main
from launcher.data.prepare import prepare_data
from launcher.data.tokens import DataError, load_training_data, open_token_dir, read_index
from launcher.data.tokenizer import byte_tokenizer, load_tokenizer_file

ROOT = Path(__file__).resolve().parents[1]
EMAIL = Path(json.__file__).parent.parent / "email"  # stdlib sources: text that ships with Python


def _prep(inputs, out, **kw):
    kw.setdefault("warn", lambda *_: None)  # warnings on stderr by default
    return prepare_data([str(i) for i in inputs], out, progress=False, log=lambda *_: None, **kw)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


# ----------------------------------------------------------------------------- deletes or leaks


def test_out_holding_an_input_or_inside_one_is_refused(tmp_path, capsys):
    """`prepare-data data/raw2 --out data --force` deleted its own input; now refused, exit 2."""
    data = tmp_path / "data"
    _prep([EMAIL / "charset.py"], data)  # data/ is a prepare-data output: --force would replace it
    (data / "raw2").mkdir()
    (data / "raw2" / "a.txt").write_text("the user's corpus\n")
    before = _tree(data)
    with pytest.raises(DataError, match=r"--out .*data holds the input .*raw2.*choose an --out outside"):
        _prep([data / "raw2"], data, force=True)
    rc = cli_main(["prepare-data", str(data / "raw2"), "--out", str(data), "--force", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(DataError, match=r"--out .*tok is inside the input .*raw2"):
        _prep([data / "raw2"], data / "raw2" / "tok")
    with pytest.raises(DataError, match=r"--out .*data holds the input .*data/tokenizer\.json"):
        _prep([EMAIL / "charset.py"], data, tokenizer=str(data / "tokenizer.json"), force=True)
    assert _tree(data) == before


@pytest.mark.timeout(60)  # without the check, ray.init retries for minutes (after the BPE)
def test_a_cluster_address_nothing_answers_at_is_refused_before_any_work(tmp_path, capsys):
    """`prepare-data ... --address HOST:WRONGPORT`: one line and exit 2, before a BPE is
    trained or a work directory made."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = cli_main(["prepare-data", str(EMAIL / "charset.py"), "--tokenizer", "bpe:300",
                   "--out", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--address 127.0.0.1:{port}: no Ray cluster answers there" in err, err
    assert "training BPE" not in err and list(tmp_path.iterdir()) == []


def test_stale_cleanup_removes_only_its_own_dead_leftovers(tmp_path):
    """A user's `.tok.old-20240101`, another host's in-progress `.partial-PID` and a symlink
    are kept; this tool's leftover from a dead process on this host is removed, also one a
    run took over and was killed before marking (named for it, marked by the run before;
    both dead), but not one named for a live process."""
    dead, dead2 = (subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2))
    dead.wait()
    dead2.wait()

    def plant(name: str, host: str, pid: int, marker: bool = True) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "keep.txt").write_text("user data")
        if marker:
            (d / ".sharded-ams-prepare.json").write_text(json.dumps(
                {"tool": "sharded-ams prepare-data", "host": host, "pid": pid}))
        return d

    user = plant(".tok.old-20240101", socket.gethostname(), 20240101, marker=False)
    other_host = plant(f".tok.partial-{dead.pid}", "another-host", dead.pid)
    mine = plant(f".tok.old-{dead.pid}", socket.gethostname(), dead.pid)
    taken_over = plant(f".tok.partial-{dead2.pid}", socket.gethostname(), dead.pid)
    live = plant(f".tok.partial-{os.getppid()}", socket.gethostname(), dead.pid)
    os.symlink(user, tmp_path / f".tok.partial-{dead2.pid + 7}")
    _prep([EMAIL / "charset.py"], tmp_path / "tok")
    assert user.exists() and other_host.exists() and (tmp_path / f".tok.partial-{dead2.pid + 7}").is_symlink()
    assert not mine.exists() and not taken_over.exists() and live.exists()
    assert (user / "keep.txt").read_text() == "user data"


# ----------------------------------------------------------------------------- ids


def _gappy_tokenizer(path: Path) -> Path:
    """The byte tokenizer plus a merge "a"+"b" -> id 70000: 257 entries, ids up to 70000."""
    d = json.loads(byte_tokenizer().hf.to_str())
    d["model"]["vocab"]["ab"] = 70000
    d["model"]["merges"] = [["a", "b"]]
    path.write_text(json.dumps(d))
    return path


def test_tokenizer_with_id_gaps_gets_room_for_its_largest_id(tmp_path):
    (tmp_path / "in.txt").write_text("ab cab\n")
    tok = _gappy_tokenizer(tmp_path / "tokenizer.json")
    index = _prep([tmp_path / "in.txt"], tmp_path / "out", tokenizer=str(tok))
    assert index["vocab_size"] == 70001 and index["dtype"] == "uint32"
    _, stream = open_token_dir(tmp_path / "out")
    assert stream.read(0, len(stream)).tolist() == [70000, 32, 99, 70000, 10]
    with pytest.raises(DataError, match="does not fit in uint16"):
        _prep([tmp_path / "in.txt"], tmp_path / "o16", tokenizer=str(tok), dtype="uint16")


def _tamper(out: Path, pos: int, value: int) -> Path:
    """Write ``value`` at token ``pos`` of shard 0 and update its sha256 in the index."""
    import hashlib

    shard = out / "shard-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[pos] = value
    ids.tofile(shard)
    index = json.loads((out / "index.json").read_text())
    index["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / "index.json").write_text(json.dumps(index))
    return shard


def test_token_ids_out_of_range_are_found_when_read(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _prep([EMAIL / "charset.py"], out)
    _tamper(out, 1234, 60000)  # vocabulary 256
    with pytest.raises(DataError, match=r"shard .*shard-00000\.bin: holds token id 60,000, not below vocab_size 256"):
        open_token_dir(out)
    _, stream = open_token_dir(out, verify="size")  # the workers' quick check: sizes only
    with pytest.raises(DataError, match=r"shard-00000\.bin: token id 60,000 at position 1,234"):
        stream.read(1000, 500)
    data = load_training_data({"path": str(out), "val_fraction": 0.1}, verify="size")
    with pytest.raises(DataError, match="shard-00000.bin"):
        data.train.read(0, len(data.train))
    # and when written: a tokenizer that gives an id beyond its vocabulary
    import launcher.data.prepare as pd

    def lying():
        t = byte_tokenizer()
        t.vocab_size = 100
        return t

    monkeypatch.setattr(pd, "byte_tokenizer", lying)
    with pytest.raises(DataError, match=r"id 1\d\d, outside its vocabulary \[0, 100\) \(writing block 0\)"):
        _prep([EMAIL / "charset.py"], tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- damaged input


@pytest.mark.parametrize("case, match", [
    ("truncated", r"a\.txt\.gz: not a complete gzip file \(EOFError"),
    ("notgzip", r"a\.txt\.gz: not a complete gzip file \(BadGzipFile"),
    ("surrogate", r"s\.jsonl:2: field 'text' holds '\\ud800', a lone surrogate"),
    ("nested", r"n\.jsonl:2: not a JSON line \(nested too deeply\)"),  # RecursionError in json.loads
])
def test_damaged_input_names_the_file(tmp_path, capsys, case, match):
    if case == "truncated":
        src = tmp_path / "a.txt.gz"
        src.write_bytes(gzip.compress(b"hello world\n" * 1000)[:-30])
    elif case == "notgzip":
        src = tmp_path / "a.txt.gz"
        src.write_bytes(b"plain text, not gzip\n")
    elif case == "nested":
        src = tmp_path / "n.jsonl"
        src.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")
    else:
        src = tmp_path / "s.jsonl"
        src.write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    with pytest.raises(DataError, match=match):
        _prep([src], tmp_path / "out")
    assert cli_main(["prepare-data", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert src.name in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_binary_files_are_skipped_and_replaced_bytes_counted(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"caf\xe9 ok\n\xff\xfe end\n")  # latin-1 bytes: 3 invalid
    (tmp_path / "in" / "b.txt").write_bytes(b"\x7fELF\x02\x01\x00\x00" + bytes(range(256)))  # binary
    tok = tmp_path / "tokenizer.json"
    byte_tokenizer().save(tok)  # as a tokenizer.json: text is decoded, so bad bytes are replaced
    warnings: list[str] = []
    _prep([tmp_path / "in"], tmp_path / "out", tokenizer=str(tok), warn=warnings.append)
    assert any(w.endswith("b.txt: looks binary (a NUL byte in its first 8,000 bytes); skipped")
               for w in warnings), warnings
    assert any(w.endswith("a.txt: 3 invalid UTF-8 byte(s) replaced by U+FFFD") for w in warnings), warnings
    _, stream = open_token_dir(tmp_path / "out")
    assert bytes(stream.read(0, len(stream)).tolist()) == "caf\ufffd ok\n\ufffd\ufffd end\n".encode()
    warnings.clear()  # the byte tokenizer keeps bytes as they are: nothing replaced, binary still skipped
    _prep([tmp_path / "in"], tmp_path / "raw", warn=warnings.append)
    assert len(warnings) == 1 and "b.txt: looks binary" in warnings[0]
    _, stream = open_token_dir(tmp_path / "raw")
    assert bytes(stream.read(0, len(stream)).tolist()) == (tmp_path / "in" / "a.txt").read_bytes()


def test_jsonl_invalid_utf8_is_replaced_and_null_text_skipped(tmp_path):
    """A JSON line (.jsonl, .json.gz) with an invalid UTF-8 byte is repaired and counted as a
    text file is, whatever the tokenizer (it was "not a JSON line", ending the run); a null
    text field is skipped and counted, as a null Parquet value."""
    raw = b'{"text": "caf\xe9 ok"}\n{"text": null}\n\xef\xbb\xbf{"text": "fine"}\n'
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(raw))
    warnings: list[str] = []
    index = _prep([tmp_path / "a.jsonl", tmp_path / "b.json.gz"], tmp_path / "out", warn=warnings.append)
    for name in ("a.jsonl", "b.json.gz"):
        assert any(w.endswith(f"{name}: 1 invalid UTF-8 byte(s) replaced by U+FFFD") for w in warnings), warnings
        assert any(w.endswith(f"{name}: 1 null text value(s) skipped") for w in warnings), warnings
    _, stream = open_token_dir(tmp_path / "out")
    assert bytes(stream.read(0, len(stream)).tolist()) == "caf\ufffd okfine".encode() * 2
    assert index["documents"] == 4


_RSS_SCRIPT = """
import resource, sys
from launcher.data.prepare import prepare_data
prepare_data([sys.argv[1]], sys.argv[2], progress=False, log=lambda *_: None, shard_tokens=1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before)
"""


def test_one_long_jsonl_line_is_tokenized_in_bounded_memory(tmp_path, monkeypatch):
    """A 24 MB JSONL line: the peak stays within a few times the line (it was ~19x)."""
    line = 24 << 20
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        f.write('{"text": "' + ("word " * (line // 5)) + '"}\n')
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "word word"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def peak_kib(path: Path, out: str) -> int:
        res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(tmp_path / out)],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return int(res.stdout.split()[-1])

    growth = (peak_kib(src, "o1") - peak_kib(small, "o2")) * 1024
    assert growth < 4 * line, f"peak grew by {growth / line:.1f}x the line"
    assert open_token_dir(tmp_path / "o1")[0]["num_tokens"] == (line // 5) * 5
    import launcher.data.inputs as inputs

    monkeypatch.setattr(inputs, "MAX_LINE_BYTES", 1 << 20)  # and a line beyond the cap is refused
    with pytest.raises(DataError, match=r"big\.jsonl:1: a JSON line over 1,048,576 bytes"):
        _prep([src], tmp_path / "o3")


# ----------------------------------------------------------------------------- the index


def _index_edit(out: Path, edit) -> Path:
    index = json.loads((out / "index.json").read_text())
    edit(index)
    (out / "index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda ix: ix.update(shards=ix["shards"] * 3, num_tokens=ix["num_tokens"] * 3),
     r"shards: shard-00000\.bin is listed more than once"),
    (lambda ix: ix["tokenizer"].update(file="../secret/creds"),
     r"tokenizer\.file '\.\./secret/creds' must be a plain file name"),
    (lambda ix: ix.update(vocab_size=70_000), r"index\.json: a vocabulary of 70,000 tokens does not fit in uint16"),
])
def test_index_fields_that_lie_are_refused(tmp_path, edit, match):
    """Each is accepted by a reader that trusts the index (mutation-checked: drop the check)."""
    out = tmp_path / "out"
    _prep([EMAIL / "charset.py"], out)
    _index_edit(out, edit)
    with pytest.raises(DataError, match=match):
        read_index(out)


def test_an_index_and_tokenizer_that_disagree_on_the_vocabulary_are_refused(tmp_path, monkeypatch):
    """index.json's vocab_size is held to the tokenizer.json beside it, when the directory
    is opened for training (driver and workers), without reading a shard: a tokenizer
    replaced by another, an index edited (both of its vocab_size entries, or one)."""
    out = tmp_path / "out"
    _prep([EMAIL / "charset.py"], out)  # byte-level: 256
    index = json.loads((out / "index.json").read_text())
    from launcher.data import tokens

    def no_shard(*_):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(tokens, "_check_shard", no_shard)  # the check reads none
    tok = out / "tokenizer.json"
    byte_json = tok.read_bytes()
    _gappy_tokenizer(tok)  # another tokenizer: ids up to 70,000
    lie = r"index\.json: vocab_size 256 is not the vocabulary of .*out/tokenizer\.json \(70,001 tokens\)"
    for verify in ("sha256", "size"):
        with pytest.raises(DataError, match=lie + ": the tokenizer was replaced"):
            load_training_data({"path": str(out)}, verify=verify)
    tok.write_bytes(byte_json)
    _index_edit(out, lambda ix: (ix.update(vocab_size=300), ix["tokenizer"].update(vocab_size=300)))
    with pytest.raises(DataError, match=r"vocab_size 300 is not the vocabulary of .*tokenizer\.json \(256 tokens\)"):
        open_token_dir(out, verify="size")
    _index_edit(out, lambda ix: ix.update(vocab_size=300, tokenizer=index["tokenizer"]))
    with pytest.raises(DataError, match=r"index\.json: tokenizer\.vocab_size 256 differs from vocab_size 300"):
        read_index(out)
    _index_edit(out, lambda ix: ix.update(vocab_size=256))
    tok.write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer\.json: not a Hugging Face tokenizer\.json"):
        open_token_dir(out, verify="size")
    tok.unlink()  # no tokenizer file: nothing to disagree with (the run records none)
    monkeypatch.undo()
    assert open_token_dir(out)[0]["vocab_size"] == 256


def test_a_deeply_nested_index_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    _prep([EMAIL / "charset.py"], out)
    (out / "index.json").write_text("[" * 100_000)
    with pytest.raises(DataError, match=r"index\.json: unreadable \(RecursionError"):
        read_index(out)


def test_missing_data_path_says_how_to_make_it(tmp_path, capsys):
    rc = cli_main(["train", str(ROOT / "launcher/configs/llama_tiny.toml"), "--set",
                   f"data.path={tmp_path / 'nope'}", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "make it with `sharded-ams prepare-data INPUT... --out" in err


@pytest.mark.parametrize("spec", ["byte", "bpe"])
def test_a_file_of_several_read_chunks_is_every_token_of_it(tmp_path, spec):
    """A text file larger than one read chunk (256 KiB) gives the tokens of a whole-file
    encode, token for token (dropping a chunk, or repeating one, shows)."""
    from launcher.data.prepare import CHUNK_BYTES

    text = "".join(p.read_text() for p in sorted(EMAIL.glob("*.py")))
    # no whitespace runs across a cut (BPE pre-tokenizes "\\n    x" as one run)
    text = "\n".join(line.strip() for line in text.splitlines() if line.strip()) * 2
    src = tmp_path / "big.txt"
    src.write_text(text)
    assert src.stat().st_size > 2 * CHUNK_BYTES
    if spec == "bpe":
        _prep([EMAIL / "charset.py"], tmp_path / "first", tokenizer="bpe:300")
        spec = str(tmp_path / "first" / "tokenizer.json")
    _prep([src], tmp_path / "out", tokenizer=spec, shard_tokens=100_000)
    tok = load_tokenizer_file(tmp_path / "out" / "tokenizer.json")
    want = tok.hf.encode(text, add_special_tokens=False).ids
    if spec != "byte":
        want.append(tok.eos_id)
    _, stream = open_token_dir(tmp_path / "out")
    got = stream.read(0, len(stream)).tolist()
    assert len(got) == len(want) and got == want
