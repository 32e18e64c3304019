"""prepare-data and the token shards: tokenizers, what the shards hold, batching, bad
input, idempotence, and a run killed from outside."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.cli import main as cli_main
from launcher.data.corpus import get_batch
from launcher.data.prepare import collect_inputs, prepare_data
from launcher.data.tokens import DataError, TokenStream, get_stream_batch, load_training_data, open_token_dir
from launcher.data.tokenizer import byte_tokenizer, load_tokenizer_file

ROOT = Path(__file__).resolve().parents[1]
EMAIL = Path(json.__file__).parent.parent / "email"  # stdlib sources: text that ships with Python
DOCS = ["héllo wörld ☃ 😀\n" * 3, "def f(x):\n    return x + 1\n", "", "tabs\tand  spaces\r\nend"]


def _write_corpus(d: Path) -> list[str]:
    """Two .txt files, a .jsonl, and a file the walk must skip; returns the documents in order."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text(DOCS[0])
    (d / "b.txt").write_text(DOCS[1])
    (d / "c.jsonl").write_text(json.dumps({"text": DOCS[2]}) + "\n\n" + json.dumps({"text": DOCS[3], "id": 7}) + "\n")
    (d / "skip.md").write_text("not taken from a directory by default")
    return DOCS


def _tokens(out: Path) -> np.ndarray:
    index, stream = open_token_dir(out)
    return stream.read(0, len(stream))


def _prep(inputs, out, **kw):
    return prepare_data([str(i) for i in inputs], out, progress=False, log=lambda *_: None, **kw)


@pytest.mark.parametrize("spec", ["byte", "bpe:300", "file"])
def test_shards_hold_the_tokenizers_output(tmp_path, spec):
    """Shards read back (several shards, across their boundaries) equal the tokenizer applied
    to each document plus the end-of-text id, in input order; tokenizer.json is saved."""
    docs = _write_corpus(tmp_path / "in")
    if spec == "file":  # an existing tokenizer.json: the BPE one from a first run
        _prep([tmp_path / "in"], tmp_path / "first", tokenizer="bpe:300")
        spec = str(tmp_path / "first" / "tokenizer.json")
    index = _prep([tmp_path / "in"], tmp_path / "out", tokenizer=spec, shard_tokens=7)
    tok = load_tokenizer_file(tmp_path / "out" / "tokenizer.json")
    want = []
    for doc in docs:  # an independent path: HF's encode on each whole document
        want += tok.hf.encode(doc, add_special_tokens=False).ids
        if index["tokenizer"]["eos_id"] is not None:
            want.append(index["tokenizer"]["eos_id"])
    got = _tokens(tmp_path / "out")
    assert got.tolist() == want
    assert len(index["shards"]) == -(-len(want) // 7) and index["num_tokens"] == len(want)
    assert index["documents"] == 4 and [s["path"] for s in index["sources"]] == \
        [str((tmp_path / "in" / n).absolute()) for n in ("a.txt", "b.txt", "c.jsonl")]
    assert index["dtype"] == "uint16" and index["vocab_size"] == tok.vocab_size
    if spec == "byte":
        assert got.tolist() == list("".join(docs).encode())  # ids are the bytes, no separator


def test_special_token_text_in_a_document_is_not_a_boundary(tmp_path):
    """``<|endoftext|>`` written in a document is text: one end-of-text id per document (the
    one appended after it), for a BPE trained here and for a tokenizer.json given."""
    docs = ["GPT-2 ends documents with <|endoftext|> in its data.", "plain <|endoftext|><|endoftext|>"] * 3
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    first = _prep([tmp_path / "in.jsonl"], tmp_path / "bpe", tokenizer="bpe:300")
    given = _prep([tmp_path / "in.jsonl"], tmp_path / "file", tokenizer=str(tmp_path / "bpe" / "tokenizer.json"))
    tok = load_tokenizer_file(tmp_path / "bpe" / "tokenizer.json")
    for index, out in ((first, "bpe"), (given, "file")):
        eos = index["tokenizer"]["eos_id"]
        ids = _tokens(tmp_path / out).tolist()
        assert eos == 0 and ids.count(eos) == index["documents"] == len(docs)
        assert ids[-1] == eos and tok.decode(ids[:ids.index(eos)]) == docs[0]


def test_gzip_inputs_read_as_their_contents(tmp_path):
    """C4-style ``.json.gz`` JSON lines and a ``.txt.gz`` give the tokens of their contents."""
    import gzip

    _write_corpus(tmp_path / "plain")
    (tmp_path / "gz").mkdir()
    for name in ("a.txt", "b.txt", "c.jsonl"):
        target = tmp_path / "gz" / (name.replace(".jsonl", ".json") + ".gz")
        target.write_bytes(gzip.compress((tmp_path / "plain" / name).read_bytes()))
    _prep([tmp_path / "plain"], tmp_path / "o1", tokenizer="bpe:300")
    _prep([tmp_path / "gz"], tmp_path / "o2", tokenizer=str(tmp_path / "o1" / "tokenizer.json"),
          ext=[".gz"])
    assert _tokens(tmp_path / "o2").tolist() == _tokens(tmp_path / "o1").tolist()


def test_byte_tokenizer_json_is_the_byte_map():
    tok = byte_tokenizer()
    text = "a\x00\xff é ☃ 😀 \n\t  end"
    ids = tok.hf.encode(text, add_special_tokens=False).ids
    assert ids == list(text.encode()) and tok.hf.decode(ids) == text


def test_long_lines_are_cut_on_character_boundaries(tmp_path):
    """A file read in pieces smaller than its lines: no character split, bytes preserved."""
    from launcher.data.prepare import _text_chunks

    data = ("x" * 5 + "é☃😀" * 7 + "\n") * 3 + "tail without newline 😀"
    path = tmp_path / "t.txt"
    path.write_bytes(data.encode())
    with open(path, "rb") as f:
        pieces = list(_text_chunks(f, 4))
    assert b"".join(pieces) == data.encode()
    for p in pieces:
        p.decode("utf-8")  # every piece is whole characters


def test_rank_slices_concatenate_to_the_world_size_1_batch(tmp_path):
    """Shard-backed batches: a function of (seed, step) only, the ranks' rows concatenate to
    the 1-worker batch, and equal the same windows read by the stdlib corpus batcher."""
    _prep([EMAIL], tmp_path / "out", ext=[".py"], shard_tokens=5000)
    index, stream = open_token_dir(tmp_path / "out")
    assert len(index["shards"]) > 3
    flat = torch.from_numpy(stream.read(0, len(stream)))
    for step in (0, 1, 17):
        gx, gy = get_stream_batch(stream, step, 8, 32, seed=3)
        assert torch.equal(gx, get_batch(flat, step, 8, 32, seed=3)[0])  # the in-memory oracle
        assert torch.equal(gx[:, 1:], gy[:, :-1])
        for world in (2, 4):
            parts = [get_stream_batch(stream, step, 8, 32, seed=3, rank=r, world_size=world) for r in range(world)]
            assert torch.equal(torch.cat([p[0] for p in parts]), gx)
            assert torch.equal(torch.cat([p[1] for p in parts]), gy)
    data = load_training_data({"path": str(tmp_path / "out"), "val_fraction": 0.1})
    n = index["num_tokens"]
    assert len(data.train) + len(data.val) == n and len(data.val) == int(n * 0.1)
    vx, _ = data.get_batch("val", 0, 4, 16, seed=0, rank=0, world_size=1)
    tail = flat[n - len(data.val):]
    for row in vx:  # validation windows come from the held-out tail
        assert any(torch.equal(tail[s:s + 16], row) for s in range(len(tail) - 15) if tail[s] == row[0])


def test_token_stream_reads_across_parts():
    parts = [np.arange(0, 5, dtype=np.uint16), np.arange(5, 6, dtype=np.uint16), np.arange(6, 20, dtype=np.uint16)]
    s = TokenStream(parts)
    for start in range(20):
        for length in range(1, 21 - start):
            assert s.read(start, length).tolist() == list(range(start, start + length))
    v = s.slice(4, 12)
    assert len(v) == 8 and v.read(0, 8).tolist() == list(range(4, 12))


def test_rerun_is_idempotent_force_replaces(tmp_path):
    _write_corpus(tmp_path / "in")
    out = tmp_path / "out"
    first = _prep([tmp_path / "in"], out, tokenizer="bpe:300")
    mtime = (out / "shard-00000.bin").stat().st_mtime_ns
    assert _prep([tmp_path / "in"], out, tokenizer="bpe:300") == first  # nothing redone
    assert (out / "shard-00000.bin").stat().st_mtime_ns == mtime
    (tmp_path / "in" / "a.txt").write_text("changed\n")
    with pytest.raises(DataError, match="other inputs or options; pass --force"):
        _prep([tmp_path / "in"], out, tokenizer="bpe:300")
    again = _prep([tmp_path / "in"], out, tokenizer="bpe:300", force=True)
    assert again["num_tokens"] != first["num_tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temp dirs left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("mine")
    with pytest.raises(DataError, match="not a prepare-data output; refusing"):
        _prep([tmp_path / "in"], tmp_path / "other", force=True)


@pytest.mark.parametrize("case, match", [
    ("missing", r"input '.*nope' does not exist"),
    ("glob", r"input glob '.*\*\.none' matches nothing"),
    ("emptydir", r"holds no \.txt/\.jsonl/\.parquet files"),
    ("empty", r"empty corpus: no text in 2 input file"),
    ("fifo", r"is not a regular file"),
    ("jsonl", r"bad\.jsonl:2: no string field 'text'"),
    ("vocab", r"vocabulary of 70,000 tokens does not fit in uint16"),
])
def test_bad_input_names_the_problem_and_writes_nothing(tmp_path, monkeypatch, case, match):
    inp = tmp_path / "in"
    inp.mkdir()
    kw = {}
    if case == "missing":
        inputs = [inp / "nope"]
    elif case == "glob":
        inputs = [str(inp / "*.none")]
    elif case == "emptydir":
        inputs = [inp]
    elif case == "empty":
        (inp / "a.txt").write_text("")
        (inp / "b.jsonl").write_text("\n")
        inputs = [inp]
    elif case == "fifo":  # a FIFO would block a reader forever: refused, not opened
        os.mkfifo(inp / "pipe.txt")
        inputs = [inp / "pipe.txt"]
    elif case == "jsonl":
        (inp / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
        inputs = [inp / "bad.jsonl"]
    else:  # a tokenizer.json with more ids than --dtype uint16 holds
        (inp / "a.txt").write_text("abc")
        inputs, kw = [inp], {"dtype": "uint16"}
        import launcher.data.prepare as pd

        def big_vocab():
            t = byte_tokenizer()
            t.vocab_size = 70_000
            return t

        monkeypatch.setattr(pd, "byte_tokenizer", big_vocab)
    with pytest.raises(DataError, match=match):
        _prep(inputs, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no temp dir either


def test_cli_prepare_data_exit_codes(tmp_path, capsys):
    assert cli_main(["prepare-data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["prepare-data", str(EMAIL), "--ext", ".py", "--out", str(tmp_path / "o"),
                     "--tokenizer", "bpe:12"]) == 2
    assert "the BPE vocabulary must be an integer" in capsys.readouterr().err
    _write_corpus(tmp_path / "in")
    assert cli_main(["prepare-data", str(tmp_path / "in"), "--ext", "md", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 0
    assert _tokens(tmp_path / "o").tolist() == list(b"not taken from a directory by default")


def _damaged(tmp_path: Path, how: str) -> Path:
    out = tmp_path / "out"
    _prep([EMAIL], out, ext=[".py"], shard_tokens=50_000)
    shard = out / "shard-00001.bin"
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 2)
    elif how == "changed":
        with open(shard, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
    elif how == "symlink":
        target = tmp_path / "elsewhere.bin"
        os.replace(shard, target)
        os.symlink(target, shard)
    elif how == "missing":
        shard.unlink()
    elif how == "index":
        (out / "index.json").unlink()
    return out


@pytest.mark.parametrize("how, match", [
    ("truncated", r"shard-00001\.bin has .* bytes, .*index\.json says .* \(truncated or changed"),
    ("changed", r"shard-00001\.bin: sha256 differs from .*index\.json"),
    ("symlink", r"shard-00001\.bin is not a regular file"),
    ("missing", r"shard .*shard-00001\.bin listed in .*index\.json is missing"),
    ("index", r"is not a prepare-data output: no index\.json"),
])
def test_damaged_data_is_refused_before_training(tmp_path, capsys, how, match):
    """`sharded-ams train` checks the data on the driver: exit 2 naming the file, no Ray."""
    out = _damaged(tmp_path, how)
    with pytest.raises(DataError, match=match):
        open_token_dir(out)
    rc = cli_main(["train", str(ROOT / "launcher/configs/llama_tiny.toml"), "--set", f"data.path={out}",
                   "--dry-run"])
    assert rc == 2
    assert "shard" in capsys.readouterr().err or how == "index"
    if how == "changed":  # sizes only: the driver's quick check lets it through
        open_token_dir(out, verify="size")


@pytest.mark.slow
def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid``."""
    out = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie or a recycled pid of another program counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"multiprocessing" in cmd


def test_killed_prepare_data_leaves_no_output(tmp_path):
    """SIGKILL at arbitrary moments: OUT is either absent or complete and valid; the next
    run removes the dead runs' temporary directories and finishes; the killed runs' pool
    workers exit (they waited for work forever)."""
    src = tmp_path / "in"
    src.mkdir()
    text = (EMAIL / "_header_value_parser.py").read_text()
    for i in range(12):
        (src / f"f{i:02d}.txt").write_text(text)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "launcher", "prepare-data", str(src), "--out", str(out),
           "--tokenizer", "bpe:1000", "--shard-tokens", "20000", "--no-progress"]
    rng = np.random.default_rng(0)

    def start_and_wait_for_writes(dest: Path) -> subprocess.Popen:
        proc = subprocess.Popen(cmd[:6] + [str(dest)] + cmd[7:], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while (not any(tmp_path.glob(f".{dest.name}.partial-*")) and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.005)
        return proc

    # how long a run spends writing on this machine, so the kills land inside that window
    t0 = time.monotonic()
    cal = start_and_wait_for_writes(tmp_path / "cal")
    t1 = time.monotonic()
    while not (tmp_path / "cal").exists() and cal.poll() is None:
        time.sleep(0.005)
    window = time.monotonic() - t1
    assert cal.wait() == 0, cal.stderr.read().decode()
    assert window > 0.02, f"prepare-data wrote for only {window:.3f} s (started {t1 - t0:.1f} s)"
    shutil.rmtree(tmp_path / "cal")
    interrupted, orphans = 0, set()
    # killed as its pool starts: workers still starting must not outlive it either
    early = subprocess.Popen(cmd, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (kids := _children(early.pid)) and early.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    orphans |= kids
    early.kill()
    early.wait()
    for _ in range(8):
        proc = start_and_wait_for_writes(out)
        time.sleep(rng.uniform(0.0, 0.9 * window))
        orphans |= _children(proc.pid)  # its pool workers: they must not outlive it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():  # it finished before the kill: then it is whole; write it again
            open_token_dir(out)
            shutil.rmtree(out)
        interrupted += any(tmp_path.glob(".out.partial-*"))  # killed mid-write
        if interrupted >= 2:
            break
    assert interrupted, "no kill landed while prepare-data was writing"
    assert orphans, "the runs killed had no pool workers (--workers defaults to the cores)"
    deadline = time.monotonic() + 30
    while (alive := {p for p in orphans if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"pool workers {sorted(alive)} outlived their SIGKILLed prepare-data"
    _prep([src], out, force=True)
    open_token_dir(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_collect_inputs_order_globs_and_symlinks(tmp_path):
    _write_corpus(tmp_path / "in")
    os.symlink(tmp_path / "in" / "a.txt", tmp_path / "in" / "z_link.txt")  # skipped in a walk
    files = collect_inputs([str(tmp_path / "in" / "*.md"), str(tmp_path / "in")])
    assert [f.name for f in files] == ["skip.md", "a.txt", "b.txt", "c.jsonl"]
    assert collect_inputs([str(tmp_path / "in" / "a.txt")] * 2) == [tmp_path / "in" / "a.txt"]


def test_a_quoted_glob_walks_the_directories_it_matches(tmp_path):
    """'d/*' gives the files the shell's d/* gives: a matched directory is walked as a named
    one (its files were dropped); a glob yielding no file at all is an error naming it."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "empty").mkdir()
    (d / "a.txt").write_text("top")
    (d / "sub" / "b.txt").write_text("deep")
    (d / "sub" / "skip.md").write_text("not an --ext file")
    files = collect_inputs([str(d / "*")])
    assert files == [d / "a.txt", d / "sub" / "b.txt"]
    assert files == collect_inputs([str(d / "a.txt"), str(d / "sub")])  # as the shell expands it
    assert collect_inputs([str(d / "s*")], exts=[".md"]) == [d / "sub" / "skip.md"]
    with pytest.raises(DataError, match=r"input glob '.*e\*' matches only directories that hold no "
                                        r"\.txt/\.jsonl/\.parquet files"):
        collect_inputs([str(d / "e*")])


def test_one_file_reached_by_two_paths_is_read_once(tmp_path):
    """Deduplicated by the file on disk (device, inode), not by the spelling of its path:
    ``d`` and ``d/../d``, a path through a symlinked directory, a hard link; the first
    spelling is the one kept (it is the one in the index's sources)."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    (d / "b.txt").write_text("other")
    os.symlink(d, tmp_path / "alias")
    os.link(d / "b.txt", tmp_path / "hard.txt")
    assert collect_inputs([str(d), str(d / ".." / "d")]) == [d / "a.txt", d / "b.txt"]
    assert collect_inputs([str(tmp_path / "alias" / "a.txt"), str(d / "a.txt")]) == [tmp_path / "alias" / "a.txt"]
    assert collect_inputs([str(d / ".." / "d" / "a.txt"), str(d)]) == [d / ".." / "d" / "a.txt", d / "b.txt"]
    assert collect_inputs([str(tmp_path / "hard.txt"), str(tmp_path / "alias")]) == \
        [tmp_path / "hard.txt", tmp_path / "alias" / "a.txt"]
