"""prepare-data throughput: 1 and 2 local workers, a simulated 3-node Ray cluster, a plain
``tokenizers`` loop and datatrove's tokenizer step, on the same corpus with the same BPE.

The corpus: the standard library's ``.py`` sources as JSON lines (one document per module,
repeated to ``--mib``), in 8 files. A BPE of ``--vocab`` is trained on it once (untimed);
every row then encodes the corpus with that ``tokenizer.json``. Each row runs in a fresh
process with the tokenizer's own threads pinned to one (``RAYON_NUM_THREADS=1``,
``TOKENIZERS_PARALLELISM=true``), so ``--workers N`` means N cores and nothing else; rows
are interleaved in ``--repeats`` rounds, ratios taken within a round. Times are wall clock
from the start of the tokenizing call to its end (process start and imports excluded; Ray
Data's start and worker processes included). Peak RSS is per worker process.

    PYTHONPATH=. python benchmarks/bench_prepare_data.py --mib 20 --repeats 2 --cluster \\
        --datatrove-python /path/to/venv-with-datatrove/bin/python

The FineWeb-Edu estimate scales the measured per-core rate (2 workers / 2, this machine) to
nodes of 64 cores, times the 2-worker scaling efficiency; reading, writing and network are
not modelled (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FINEWEB_EDU_TOKENS = 1.3e12
ROWS = ("tokenizers loop", "datatrove", "workers 1", "workers 2", "cluster 3 nodes")
PINNED = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "true", "RAY_AUTH_MODE": "disabled"}


# ----------------------------------------------------------------------------- one row, own process


def _rss_mib(children: bool = False) -> float:
    """Peak RSS of this process (VmHWM: ru_maxrss would carry the parent's peak across
    fork + exec) or, with ``children``, of its largest child (ru_maxrss; forked workers)."""
    with open("/proc/self/status") as f:
        own = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if children else 0
    return max(own, kids) / 1024


def _cpu_s() -> float:
    """User + system CPU seconds of this process and its reaped children (pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _one_loop(corpus: Path, tok: Path, out: Path) -> dict:
    """A plain loop: encode_batch_fast over ~2 MiB batches of documents, ids + EOS as uint16."""
    import numpy as np
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tok))
    eos = hf.token_to_id("<|endoftext|>")
    t0, c0, n = time.perf_counter(), _cpu_s(), 0
    with open(out / "loop.bin", "wb") as f:
        for path in sorted(corpus.glob("*.jsonl")):
            batch, size = [], 0
            with path.open() as fh:
                lines = fh.readlines()
            for line in [*lines, None]:
                if line is not None:
                    batch.append(json.loads(line)["text"])
                    size += len(batch[-1])
                if batch and (line is None or size > 2 << 20):
                    for enc in hf.encode_batch_fast(batch, add_special_tokens=False):
                        ids = np.asarray([*enc.ids, eos], dtype=np.uint16)
                        f.write(ids.tobytes())
                        n += len(ids)
                    batch, size = [], 0
    return {"tokens": n, "seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_s() - c0,
            "peak_rss_mib": _rss_mib()}


def _one_datatrove(corpus: Path, tok: Path, out: Path, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[
        JsonlReader(str(corpus), glob_pattern="*.jsonl"),
        DocumentTokenizer(str(out / "dt"), tokenizer_name_or_path=str(tok), eos_token="<|endoftext|>",
                          shuffle_documents=False)],
        tasks=8, workers=workers, logging_dir=str(out / "dt_logs")).run()
    secs = time.perf_counter() - t0
    n = sum(p.stat().st_size for p in (out / "dt").glob("*.ds")) // 2
    # cpu_seconds: not measurable, its pool's workers are not reaped into RUSAGE_CHILDREN
    return {"tokens": n, "seconds": secs, "cpu_seconds": None, "peak_rss_mib": _rss_mib(children=workers > 1)}


def _one_prepare(corpus: Path, tok: Path, out: Path, workers: int, address: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    from launcher.data.prepare import prepare_data

    info: dict = {}
    t0, c0 = time.perf_counter(), _cpu_s()
    index = prepare_data([str(corpus)], out / "prep", tokenizer=str(tok), workers=workers, address=address,
                         progress=False, log=lambda *_: None, run_info=info)
    secs = time.perf_counter() - t0
    peak = max(info["workers"].values()) / 1024
    return {"tokens": index["num_tokens"], "seconds": secs, "encode_seconds": info["encode_seconds"],
            # on a cluster the tasks run in Ray's worker processes: not counted here
            "cpu_seconds": _cpu_s() - c0 if address is None else None,
            "blocks": info["blocks"], "worker_processes": len(info["workers"]),
            "peak_rss_mib": peak}  # per worker process (with --workers 1: this process)


def _run_one(args) -> None:
    corpus, tok, out = Path(args.corpus), Path(args.tok), Path(args.work)
    if args.one == "tokenizers loop":
        res = _one_loop(corpus, tok, out)
    elif args.one.startswith("datatrove"):
        res = _one_datatrove(corpus, tok, out, args.workers)
    else:
        res = _one_prepare(corpus, tok, out, args.workers, args.address)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- the driver


def _make_corpus(d: Path, mib: int) -> Path:
    from launcher.data.corpus import _stdlib_sources

    docs = [Path(full).read_text(errors="replace") for _, full in _stdlib_sources()]
    d.mkdir(parents=True)
    target, written, i = mib << 20, 0, 0
    from contextlib import ExitStack

    with ExitStack() as stack:
        files = [stack.enter_context(open(d / f"part-{k}.jsonl", "w")) for k in range(8)]
        while written < target:
            doc = docs[i % len(docs)]
            files[i % 8].write(json.dumps({"text": doc}) + "\n")
            written, i = written + len(doc), i + 1
    return d


def _measure(row: str, args, corpus: Path, tok: Path, address: str | None) -> dict:
    python = args.datatrove_python if row.startswith("datatrove") else sys.executable
    workers = {"workers 1": 1, "workers 2": 2, "cluster 3 nodes": 2}.get(row, args.dt_workers)
    with tempfile.TemporaryDirectory(dir=args.tmp) as work:
        cmd = [python, __file__, "--one", row, "--corpus", str(corpus), "--tok", str(tok), "--work", work,
               "--workers", str(workers)] + (["--address", address] if row.startswith("cluster") else [])
        env = {**os.environ, **PINNED, "PYTHONPATH": str(ROOT)}
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"{row} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out = json.loads(line[len("RESULT "):])
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    return out


def _fineweb(rounds: list[dict]) -> list[dict]:
    """FineWeb-Edu's hours on 8 and 64 nodes of 64 cores, from two per-core rates: wall
    clock here (this machine's share of its cores, pessimistic when it is loaded) and tokens
    per CPU-second (an idle core's), each times the 2-worker efficiency on the same basis."""
    rows = []
    for basis, key in (("wall clock", "tokens_per_s"), ("CPU time", "tokens_per_cpu_s")):
        if not rounds[0]["workers 1"].get("cpu_seconds") and key == "tokens_per_cpu_s":
            continue
        per = [{r: x["tokens"] / (x["seconds"] if key == "tokens_per_s" else x["cpu_seconds"])
                for r, x in rnd.items() if r.startswith("workers")} for rnd in rounds]
        core = statistics.median(p["workers 1"] for p in per)
        eff = min(1.0, statistics.median(p["workers 2"] / p["workers 1"] for p in per) /
                  (2 if key == "tokens_per_s" else 1))
        for nodes in (8, 64):
            rate = core * 64 * nodes * eff
            rows.append({"basis": basis, "per_core": core, "efficiency": eff, "nodes": nodes,
                         "cores": 64 * nodes, "tokens_per_s": rate, "hours": FINEWEB_EDU_TOKENS / rate / 3600})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=20, help="corpus size (MiB of text)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--cluster", action="store_true", help="also a simulated 3-node Ray cluster row")
    ap.add_argument("--datatrove-python", default=None, metavar="PYTHON",
                    help="a python with datatrove installed (its own venv): adds datatrove rows")
    ap.add_argument("--dt-workers", type=int, default=2, help="datatrove's local workers")
    ap.add_argument("--tmp", default=None, help="where the corpus and outputs go")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--tok", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    import bench_common  # after --one's early exit would be nicer, but argparse needs its args

    bench_common.add_out_args(ap, "bench_prepare_data.json")
    args = ap.parse_args()
    _drive(args, bench_common)


def _drive(args, bench_common) -> None:
    from launcher.data.prepare import prepare_data

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        args.tmp = tmp
        corpus = _make_corpus(Path(tmp) / "corpus", args.mib)
        t0 = time.perf_counter()
        prepare_data([str(corpus)], Path(tmp) / "bpe", tokenizer=f"bpe:{args.vocab}", progress=False,
                     log=lambda *_: None)
        train_s = time.perf_counter() - t0
        tok = Path(tmp) / "bpe" / "tokenizer.json"
        rows = [r for r in ROWS if (r != "datatrove" or args.datatrove_python)
                and (r != "cluster 3 nodes" or args.cluster)]
        cluster = _start_cluster() if args.cluster else None
        try:
            rounds = []
            for _ in range(args.repeats):
                rounds.append({r: _measure(r, args, corpus, tok, cluster.address if cluster else None)
                               for r in rows})
        finally:
            if cluster is not None:
                cluster.shutdown()
    table = _summarize(rounds, rows)
    bench_common.print_table(table, ["row", "tokens_per_s", "vs_workers_1", "seconds", "tokens_per_cpu_s",
                                     "tokens", "peak_rss_mib", "workers"])
    est = _fineweb(rounds)
    print()
    bench_common.print_table(est, ["basis", "per_core", "efficiency", "nodes", "cores", "tokens_per_s", "hours"])
    print(f"\nBPE training (untimed rows): {train_s:.1f} s; corpus {args.mib} MiB")
    payload = {"env": bench_common.env_info(), "mib": args.mib, "vocab": args.vocab, "repeats": args.repeats,
               "rows": table, "rounds": rounds, "fineweb_edu_estimate": est, "bpe_train_seconds": train_s}
    bench_common.write_json(bench_common.resolve_out(args.out, args.update_record, "bench_prepare_data.json"),
                            payload)


def _start_cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False))
    for _ in range(2):
        c.add_node(num_cpus=1)
    return c


def _summarize(rounds: list[dict], rows) -> list[dict]:
    table = []
    for row in rows:
        runs = [r[row] for r in rounds]
        table.append({"row": row, "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                      "vs_workers_1": statistics.median(r[row]["tokens_per_s"] / r["workers 1"]["tokens_per_s"]
                                                        for r in rounds),
                      "seconds": statistics.median(x["seconds"] for x in runs),
                      "tokens_per_cpu_s": (statistics.median(x["tokens"] / x["cpu_seconds"] for x in runs)
                                           if runs[0].get("cpu_seconds") else None),
                      "tokens": runs[0]["tokens"], "peak_rss_mib": max(x["peak_rss_mib"] for x in runs),
                      "workers": runs[0].get("worker_processes", "")})
    return table


if __name__ == "__main__":
    if "--one" in sys.argv:  # a row's own process: no torch, no bench_common (datatrove's venv has neither)
        p = argparse.ArgumentParser()
        for a in ("--one", "--corpus", "--tok", "--work", "--address"):
            p.add_argument(a, default=None)
        p.add_argument("--workers", type=int, default=1)
        _run_one(p.parse_args())
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        main()
