"""prepare-data on a Ray cluster through Ray Data (issue 24), simulated on this machine: a head
with no CPUs and two worker nodes of one CPU each (``ray.cluster_utils.Cluster``; one cluster
for the module, the expensive part). A worker node is removed while the job runs: the job
still finishes, each block is committed once, and the output is byte for byte the
single-process run's."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported (2.60 default: token)

from ray.cluster_utils import Cluster  # noqa: E402

from launcher.data.prepare import prepare_data  # noqa: E402

pytestmark = pytest.mark.slow

EMAIL = Path(json.__file__).parent.parent / "email"
BLOCK = 48 << 10


@pytest.fixture(scope="module")
def cluster():
    # GCS health checks every 1 s, 3 misses: a removed node is declared dead in ~3 s, not ~15 s
    c = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False,
        _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3}))
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    yield c, nodes
    import ray

    ray.shutdown()
    c.shutdown()


def _prep(inputs, out, **kw):
    return prepare_data([str(i) for i in inputs], out, progress=False, log=lambda *_: None,
                        warn=lambda *_: None, **kw)


def _tree(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != ".sharded-ams-prepare.json"}


def _corpus(d: Path) -> Path:
    """~1.1 MiB of stdlib text in JSON lines, plain text and Parquet: ~20 blocks of BLOCK bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir()
    docs = [p.read_text() for p in sorted(EMAIL.rglob("*.py"))]
    with open(d / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    (d / "b.txt").write_text("".join(docs))
    pq.write_table(pa.table({"text": docs}), d / "c.parquet", row_group_size=4)
    return d


def _remove_node_once_blocks_commit(c, node, partial_glob: str, root: Path, seen: dict) -> threading.Thread:
    """A thread that removes ``node`` as soon as 2 blocks are committed (recording how many
    were, and whether the output existed already)."""
    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = [p for p in root.glob(partial_glob) if not p.name.startswith(".")]
            if len(done) >= 2:
                seen.update(committed=len(done), finished=(root / "out").exists())
                c.remove_node(node, allow_graceful=False)
                seen["removed"] = True
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_a_node_lost_mid_job_still_gives_the_single_process_output(tmp_path, cluster):
    c, nodes = cluster
    src = _corpus(tmp_path / "in")
    _prep([EMAIL / "charset.py"], tmp_path / "tok", tokenizer="bpe:300")
    kw = dict(tokenizer=str(tmp_path / "tok" / "tokenizer.json"), block_bytes=BLOCK, shard_tokens=20_000)
    _prep([src], tmp_path / "ref", workers=1, **kw)
    seen: dict = {}
    watcher = _remove_node_once_blocks_commit(c, nodes[1], ".out.partial-*/blocks/*", tmp_path, seen)
    info: dict = {}
    _prep([src], tmp_path / "out", address=c.address, run_info=info, **kw)
    watcher.join(60)
    print(f"\ncluster run: {info['blocks']} blocks, node removed after {seen.get('committed')} were "
          f"committed; workers {sorted(info['workers'])}; abandoned attempts {info['abandoned_attempts']}")
    assert seen.get("removed") and not seen["finished"] and seen["committed"] < info["blocks"] - 2
    # every block committed once, none twice (a task rerun after its node was lost finds its
    # block committed, or commits the block the lost attempt never finished)
    assert info["committed_twice"] == 0 and info["fresh_blocks"] <= info["blocks"]
    assert _tree(tmp_path / "out") == _tree(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "ref", "tok"]
