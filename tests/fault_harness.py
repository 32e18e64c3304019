"""The outside world of tests/test_faults.py: a simulated multi-node Ray cluster whose
nodes can be removed and added (:class:`SimCluster`), a training run started by the CLI in
its own process (:class:`Driver`), and a watcher of its run directory (:class:`Watcher`).
Split from the test file by job: the harness here, the fault scenarios and their checks
there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # before ray is imported (2.60 default: token)

from ray.cluster_utils import Cluster  # noqa: E402

from launcher.run.ray_orphans import reap  # noqa: E402
from launcher.run.records import Heartbeat, read_events  # noqa: E402
from sharded_ams.checkpoint import CheckpointError, validate_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPT_TINY = ROOT / "launcher" / "configs" / "gpt_tiny.toml"
JOB = ["--set", "job.checkpoint_every=10", "--set", "job.log_every=1", "--set", "job.keep_last=1000",
       "--set", "job.eval_every=0", "--set", "job.max_failures=5", "--set", "optim.backend=eager",
       "--set", "optim.schedule=constant", "--set", "data.max_bytes=200000", "--set", "data.eval_iters=2"]
RUN_TIMEOUT_S = 420  # one run, restarts included; a hang fails the test, never stalls CI


class SimCluster:
    """The module's cluster: the head and its worker nodes, which tests may remove and add."""

    def __init__(self, tmpdir: str):
        self.tmpdir = tmpdir  # the workers' TMPDIR: their checkpoint temp dirs appear here
        # GCS health checks every 1 s, 3 misses (Ray's default: 3 s, 5): a removed node is
        # declared dead in ~3 s instead of ~15 s.
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=0, include_dashboard=False,
            _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3}))
        self.nodes: list = []
        self.raylets = self._raylets([self.cluster.head_node])  # every raylet it ever had
        for _ in range(2):
            self.add_node()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self):
        node = self.cluster.add_node(num_cpus=1, env_vars={"TMPDIR": self.tmpdir})
        self.nodes.append(node)
        self.raylets |= self._raylets([node])
        return node

    def remove_node(self, node) -> float:
        """Lose ``node`` at once: SIGKILL its raylet and every process it started (Ray's
        ``remove_node`` kills the raylet; its workers would notice only later), then let Ray
        clean up. Returns the time of the kill."""
        raylets = self._raylets([node])
        for pid in [*raylets, *self._children(raylets)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        t = time.time()
        self.nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)
        return t

    def restore(self) -> None:
        while len(self.nodes) < 2:
            self.add_node()

    @staticmethod
    def _raylets(nodes) -> set[int]:
        return {p.process.pid for n in nodes for p in n.all_processes.get("raylet", [])}

    @staticmethod
    def _children(parents: set[int], prefix: str = "") -> list[int]:
        """PIDs whose parent is in ``parents`` and whose command line starts with ``prefix``."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in parents and cmd.startswith(prefix):
                pids.append(int(entry))
        return pids

    def train_workers(self) -> list[int]:
        """PIDs of the Ray Train worker processes on the worker nodes (children of their
        raylets: never another Ray's processes on this machine)."""
        return self._children(self._raylets(self.nodes), "ray::RayTrainWorker")

    def shutdown(self) -> None:
        """Ray's shutdown, then the processes of this cluster that hung in their exit (Ray
        2.60; launcher/run/ray_orphans.py): one was left by about every other suite run."""
        session = self.cluster.head_node.get_session_dir_path()
        self.cluster.shutdown()
        for raylet in self.raylets:
            reap(raylet, session)


_DRIVERS: list = []  # every Driver started, for the tests' clean-up


def _sigint_as_in_a_terminal() -> None:
    """The driver gets Ctrl-C as a user's terminal delivers it. A suite run in the
    background (``&``, a CI runner) ignores SIGINT, and a child inherits an ignored signal,
    so Python would install no KeyboardInterrupt handler and SIGINT would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Driver:
    """``sharded-ams train`` in its own process (session), output to ``<name>.log``."""

    def __init__(self, cluster: SimCluster, storage: Path, name: str, steps: int, *extra: str,
                 env: dict | None = None):
        self.run_dir = storage / name
        self.log = storage / f"{name}.log"
        self.cmd = [sys.executable, "-m", "launcher", "train", str(GPT_TINY), "--address", cluster.address,
                    "--storage-path", str(storage), "--name", name, "--steps", str(steps), *JOB, *extra]
        # no PreemptionWatcher actor per group start (CPU; no cloud preemption here)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.05",
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                    **(env or {})}
        self.proc = None
        self.start()

    def start(self) -> None:
        _DRIVERS.append(self)
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.run_dir.parent, start_new_session=True,
                                         preexec_fn=_sigint_as_in_a_terminal)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run {self.run_dir.name} did not finish in {timeout} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the driver process (Ray then ends its job: controller and workers)."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Ctrl-C (SIGINT), or a scheduler's SIGTERM, to the driver process."""
        os.kill(self.proc.pid, signum)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-n:])


class Watcher:
    """Watches a run dir from outside: every checkpoint that is committed at any moment
    (a manifest, every file at its size), the heartbeat's step, the start events."""

    def __init__(self, run_dir: Path, driver: Driver):
        self.run_dir, self.driver = run_dir, driver
        self.committed: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scan()
            time.sleep(0.05)

    def scan(self) -> None:
        for d in sorted(self.run_dir.glob("step-*")):
            if str(d) in self.committed or not (d / "manifest.json").is_file():
                continue
            try:
                self.committed[str(d)] = validate_checkpoint(d, checksums=False).step
            except CheckpointError:
                pass  # being uploaded, or a save cut short

    def newest_committed(self) -> int:
        return max(self.committed.values(), default=0)

    def step(self) -> int:
        hb = Heartbeat.read(str(self.run_dir))
        return hb["step"] if hb else 0

    def events(self) -> list[dict]:
        return read_events(str(self.run_dir))

    def until(self, cond, what: str, timeout: float = 240, poll: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if not self.driver.running():
                pytest.fail(f"the run ended while waiting for {what}:\n{self.driver.tail()}")
            if time.monotonic() > deadline:
                self.driver.kill()
                pytest.fail(f"timed out after {timeout} s waiting for {what}:\n{self.driver.tail()}")
            time.sleep(poll)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.scan()
