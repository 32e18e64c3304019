"""prepare-data at scale (issue 24): Parquet and Hugging Face ``datasets`` inputs, the block
plan, ``--workers N`` writing the same bytes as one process, a killed run resumed, and
columnar bad input refused in one line naming file and column, nothing left behind.

Inputs are made here from the standard library's sources (nothing downloaded); pyarrow and
``datasets`` come with the ``test`` extra."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launcher.cli import main as cli_main
from launcher.data.blocks import plan_blocks
from launcher.data.prepare import prepare_data
from launcher.data.tokens import DataError, open_token_dir
from launcher.data.tokenizer import load_tokenizer_file

ROOT = Path(__file__).resolve().parents[1]
EMAIL = Path(json.__file__).parent.parent / "email"  # stdlib sources: text that ships with Python


def _docs() -> list[str]:
    """~30 real documents (the email package's modules), in a fixed order."""
    return [p.read_text() for p in sorted(EMAIL.glob("*.py"))]


def _prep(inputs, out, **kw):
    kw.setdefault("warn", lambda *_: None)
    return prepare_data([str(i) for i in inputs], out, progress=False, log=lambda *_: None, **kw)


def _tree(d: Path) -> dict:
    """Every file of ``d`` (bytes); the marker names the host and pid of the run: left out."""
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != ".sharded-ams-prepare.json"}


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    """A small BPE trained once for the module (any tokenizer.json would do)."""
    d = tmp_path_factory.mktemp("tok")
    _prep([EMAIL / "charset.py", EMAIL / "header.py"], d / "t", tokenizer="bpe:400")
    return d / "t" / "tokenizer.json"


def _write_parquet(path: Path, texts, row_group_size: int = 3, **columns) -> Path:
    pq.write_table(pa.table({"text": texts, **columns}), path, row_group_size=row_group_size)
    return path


def _oracle(tok_file: Path, docs) -> list[int]:
    """The tokenizer on each whole document plus end-of-text, in order (HF's own encode)."""
    tok = load_tokenizer_file(tok_file)
    want: list[int] = []
    for doc in docs:
        want += tok.hf.encode(doc, add_special_tokens=False).ids + [tok.eos_id]
    return want


def test_parquet_and_datasets_dirs_give_each_rows_tokens(tmp_path, tok_file):
    """Parquet row groups split across blocks and a ``save_to_disk`` directory give the
    tokenizer's ids of every row in order; null rows are skipped and reported."""
    import datasets

    docs = [d[:3000] for d in _docs()[:12]]  # under one read piece: the oracle encodes whole docs
    _write_parquet(tmp_path / "a.parquet", docs[:5] + [None])
    _write_parquet(tmp_path / "b.parquet", docs[5:8], row_group_size=1)
    datasets.Dataset.from_dict({"text": docs[8:], "n": list(range(4))}).save_to_disk(str(tmp_path / "ds"))
    warnings: list[str] = []
    info: dict = {}
    index = _prep([tmp_path / "*.parquet", tmp_path / "ds"], tmp_path / "out", tokenizer=str(tok_file),
                  block_bytes=4000, warn=warnings.append, run_info=info)
    _, stream = open_token_dir(tmp_path / "out")
    assert stream.read(0, len(stream)).tolist() == _oracle(tok_file, docs)
    assert index["documents"] == 12 and info["blocks"] >= 4
    assert warnings == [f"warning: {tmp_path / 'a.parquet'}: 1 null text value(s) skipped"]


def test_the_plan_cuts_after_newlines_and_keeps_gz_and_row_groups_whole(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(2000)))
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 5000))
    _write_parquet(tmp_path / "p.parquet", ["doc"] * 9, row_group_size=2)
    files = [big, tmp_path / "c.json.gz", tmp_path / "p.parquet"]
    blocks = plan_blocks(files, "text", 10_000)
    segs = [s for b in blocks for s in b.segments]
    text = big.read_bytes()
    cuts = [s.end for s in segs if s.path == str(big)]
    assert len(cuts) > 5 and cuts[-1] == len(text) and all(text[c - 1:c] == b"\n" for c in cuts)
    assert [s.start for s in segs if s.path == str(big)] == [0, *cuts[:-1]]  # contiguous, no gap
    assert [s.ends_doc for s in segs if s.path == str(big)] == [False] * (len(cuts) - 1) + [True]
    gz = [s for s in segs if s.path.endswith(".gz")]
    assert len(gz) == 1 and (gz[0].start, gz[0].end) == (0, (tmp_path / "c.json.gz").stat().st_size)
    rgs = sorted((s.start, s.end) for s in segs if s.kind == "parquet")
    assert rgs[0][0] == 0 and rgs[-1][1] == 5 and all(a[1] == b[0] for a, b in zip(rgs, rgs[1:], strict=False))
    assert [b.id for b in blocks] == list(range(len(blocks)))


def _mixed_corpus(d: Path) -> Path:
    """Text split across blocks, JSON lines, C4-style .json.gz and Parquet."""
    d.mkdir()
    docs = _docs()
    (d / "a.txt").write_text("".join(docs[:6]))
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[6:12]))
    (d / "c.json.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                                        for t in docs[12:15]).encode()))
    _write_parquet(d / "d.parquet", docs[15:], row_group_size=2)
    return d


def test_workers_write_the_same_bytes_as_one_process(tmp_path, tok_file):
    """--workers 2 (a process pool) and --workers 1 (this process): the same shards, the
    same index.json byte for byte (sha256), whatever order the blocks finished in."""
    src = _mixed_corpus(tmp_path / "in")
    kw = dict(ext=[".txt", ".jsonl", ".gz", ".parquet"], tokenizer=str(tok_file), block_bytes=40_000,
              shard_tokens=3000)
    one, two = {}, {}
    _prep([src], tmp_path / "w1", workers=1, run_info=one, **kw)
    _prep([src], tmp_path / "w2", workers=2, run_info=two, **kw)
    assert one["blocks"] == two["blocks"] >= 6
    assert len(one["workers"]) == 1 and len(two["workers"]) == 2  # two processes did share the work
    t1, t2 = _tree(tmp_path / "w1"), _tree(tmp_path / "w2")
    assert t1.keys() == t2.keys() and all(t1[k] == t2[k] for k in t1)
    assert hashlib.sha256(t1["index.json"]).digest() == hashlib.sha256(t2["index.json"]).digest()
    assert sum(k.startswith("shard-") for k in t1) > one["blocks"]  # blocks of several shards too


_KILL_AFTER = """
import os, signal, sys
import launcher.data.executors as ex
from launcher.data.prepare import prepare_data
real, done = ex.encode_block, []
def encode_then_die(job, block):
    if len(done) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # killed from outside, as a preempted machine
    done.append(block.id)
    return real(job, block)
ex.encode_block = encode_then_die
prepare_data([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[4], block_bytes=40_000, workers=1,
             progress=False, log=lambda *_: None)
"""


def test_a_killed_run_resumes_where_it_stopped(tmp_path, tok_file):
    """SIGKILL after 3 blocks committed; the same command again does only the other blocks
    and writes what an uninterrupted run writes."""
    src = _mixed_corpus(tmp_path / "in")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", _KILL_AFTER, str(src), str(tmp_path / "out"), "3",
                          str(tok_file)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == -9, res.stderr
    assert not (tmp_path / "out").exists()
    assert len([p for p in tmp_path.glob(".out.partial-*/blocks/*") if not p.name.startswith(".")]) == 3
    info: dict = {}
    _prep([src], tmp_path / "out", tokenizer=str(tok_file), block_bytes=40_000, run_info=info)
    assert info["resumed"] and info["blocks_before"] == 3 and info["fresh_blocks"] == info["blocks"] - 3
    _prep([src], tmp_path / "clean", tokenizer=str(tok_file), block_bytes=40_000)
    assert _tree(tmp_path / "out") == _tree(tmp_path / "clean")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "in", "out"]  # nothing left over


def _bad_columnar(tmp_path: Path, case: str) -> tuple[list, str]:
    """An input for ``case`` and the regex its error must match."""
    if case == "unreadable":
        (tmp_path / "x.parquet").write_bytes(b"PAR1 not really a parquet file")
        return [tmp_path / "x.parquet"], r"x\.parquet: not a readable Parquet file"
    if case == "truncated":
        good = _write_parquet(tmp_path / "t.parquet", _docs()[:6])
        good.write_bytes(good.read_bytes()[:-100])
        return [good], r"t\.parquet: not a readable Parquet file"
    if case == "missing":
        pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "m.parquet")
        return [tmp_path / "m.parquet"], r"m\.parquet: no column 'text' \(it has: body\); choose .*--text-field"
    if case == "notstring":
        pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
        return [tmp_path / "n.parquet"], r"n\.parquet: column 'text' holds int64, not strings"
    import datasets

    if case == "emptyds":
        datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "ds"))
        return [tmp_path / "ds"], r"input .*ds.: a Hugging Face datasets directory with no data files"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    return [tmp_path / "dd"], r"'.*dd' is a Hugging Face DatasetDict with splits \['train'\]; give one split"


@pytest.mark.parametrize("case", ["unreadable", "truncated", "missing", "notstring", "emptyds", "dictds"])
def test_bad_columnar_input_is_one_line_naming_file_and_column(tmp_path, capsys, case):
    inputs, match = _bad_columnar(tmp_path, case)
    capsys.readouterr()  # datasets' own progress output while making the input
    with pytest.raises(DataError, match=match):
        _prep(inputs, tmp_path / "out")
    assert cli_main(["prepare-data", *map(str, inputs), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))  # nothing half-written


def test_bad_input_found_by_a_worker_process_removes_the_partial_output(tmp_path, tok_file):
    """A DataError raised in a pool worker (a bad JSON line in a late block) reaches the
    caller as the same one-line error; the pool stops and no partial directory is left."""
    src = _mixed_corpus(tmp_path / "in")
    (src / "z.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"z\.jsonl:2: no string field 'text'"):
        _prep([src], tmp_path / "out", tokenizer=str(tok_file), block_bytes=40_000, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_two_attempts_at_one_block_commit_it_once(tmp_path, tok_file):
    """A task retried while its first attempt still runs (a node cut off, not dead): the
    second attempt to finish finds the block committed, discards its copy and says so; the
    committed files are the first's, untouched."""
    from launcher.data import encode
    from launcher.data.tokens import sha256_file

    src = _mixed_corpus(tmp_path / "in")
    block = plan_blocks(sorted(src.iterdir()), "text", 40_000)[1]
    work = tmp_path / "work"
    (work / encode.BLOCKS).mkdir(parents=True)
    (work / "tokenizer.json").write_bytes(tok_file.read_bytes())
    tok = load_tokenizer_file(tok_file)
    job = encode.EncodeJob(str(work), "file", sha256_file(tok_file), tok.eos_id, tok.vocab_size, "uint16",
                           3000, "text")
    first, won = encode._attempt(job, block)
    committed = {p.name: (p.stat().st_ino, p.read_bytes()) for p in encode.block_dir(work, 1).iterdir()}
    second, won_again = encode._attempt(job, block)  # as if it started before the first committed
    assert won and not won_again and second == first
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in encode.block_dir(work, 1).iterdir()} == committed
    assert [p.name for p in (work / encode.BLOCKS).iterdir()] == ["000001"]  # the loser's copy is gone
    again = encode.encode_block(job, block)  # and a rerun of the task only reads the record
    assert not again["fresh"] and again["shards"] == first["shards"]


def test_a_ray_task_hands_bad_input_back_as_a_record(tmp_path, tok_file):
    """Ray would give the driver only a traceback's text: the map function returns the
    DataError's message as a record instead, which the driver raises (checked on a real
    cluster by hand; here the function itself, no Ray)."""
    from launcher.data import encode
    from launcher.data.executors import _ray_encode
    from launcher.data.tokens import sha256_file

    (tmp_path / "z.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    block = plan_blocks([tmp_path / "z.jsonl"], "text", 1 << 20)[0]
    (tmp_path / "w" / encode.BLOCKS).mkdir(parents=True)
    (tmp_path / "w" / "tokenizer.json").write_bytes(tok_file.read_bytes())
    job = encode.EncodeJob(str(tmp_path / "w"), "file", sha256_file(tok_file), 0, 400, "uint16", 100, "text")
    out = _ray_encode({"block": [block.to_json()]}, job)
    assert [json.loads(r) for r in out["record"]] == [
        {"error": f"{tmp_path / 'z.jsonl'}:2: no string field 'text' (choose the field with --text-field)"}]


def test_cli_block_bytes_and_workers(tmp_path, capsys):
    """``--block-bytes 8K --workers 1`` is the API's ``block_bytes=8192``; a bad size or worker
    count is refused with exit status 2."""
    _prep([EMAIL / "charset.py"], tmp_path / "api", block_bytes=8192, workers=1)
    assert cli_main(["prepare-data", str(EMAIL / "charset.py"), "--out", str(tmp_path / "cli"), "--block-bytes",
                     "8K", "--workers", "1", "--no-progress"]) == 0
    assert _tree(tmp_path / "cli") == _tree(tmp_path / "api")
    assert len(json.loads((tmp_path / "cli" / "index.json").read_text())["shards"]) > 1  # several blocks
    with pytest.raises(SystemExit) as exc:
        cli_main(["prepare-data", str(EMAIL / "charset.py"), "--out", str(tmp_path / "x"), "--block-bytes", "8X"])
    assert exc.value.code == 2 and "not a size: '8X'" in capsys.readouterr().err
    assert cli_main(["prepare-data", str(EMAIL / "charset.py"), "--out", str(tmp_path / "x"), "--workers", "0"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
