"""The run's own records (launcher.run.records: metrics history, start events, heartbeat, size
history, restart cost) and what of Ray's console output the driver shows (launcher.run.console).
No Ray runs: the fault tests (tests/test_faults.py) check the same records on real runs."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from launcher.run.console import filter_line, filter_text, quiet_ray_logs
from launcher.run.records import (HISTORY_FILE, Heartbeat, MetricsHistory, describe_start, format_sizes,
                              read_events, read_history, size_history, start_event)


def test_metrics_history_write_and_read(tmp_path):
    """Rank 0's metrics.jsonl (MetricsHistory) read back by the driver (read_history): one
    record per step in step order, the newest record of a step re-trained after a restart,
    no records an abandoned attempt left past its checkpoint; every line a step record."""
    run_dir = str(tmp_path / "run")
    assert read_history(run_dir) == []  # a new run

    def attempt(name, launch, start, steps, extra=None):
        h = MetricsHistory(run_dir, launch, name)
        h.event({"start_step": start, "world_size": 2})  # rides on the attempt's first record
        for s in steps:
            h.append({"step": s, "start_step": start, "loss": 5.0 - s / 100 - (name == "b") / 10,
                      "grad_norm": float("nan"), "lr": 1e-3, "world_size": 2, **(extra or {}).get(s, {})})

    attempt("a", "L1", 0, [5, 10, 15], {10: {"val_loss": 4.9}})  # checkpoint at 10; dies after 15
    with open(tmp_path / "run" / HISTORY_FILE, "a") as f:
        f.write('{"step": 16, "lo')  # a line cut short: skipped
    attempt("b", "L1", 10, [15, 20, 25])  # restarted from step 10; the driver dies after 25
    attempt("c", "L2", 20, [30])  # relaunched from the step-20 checkpoint, log_every=10
    hist = read_history(run_dir)
    assert [(r["step"], r["attempt"]) for r in hist] == [(5, "a"), (10, "a"), (15, "b"), (20, "b"),
                                                         (30, "c")]
    assert hist[1]["val_loss"] == 4.9 and "val_loss" not in hist[0]
    assert hist[2]["loss"] == pytest.approx(5.0 - 0.15 - 0.1) and hist[2]["start_step"] == 10
    assert hist[-1]["launch_id"] == "L2" and hist[0]["grad_norm"] is None  # NaN -> null
    lines = (tmp_path / "run" / HISTORY_FILE).read_text().splitlines()
    for line in lines[:3]:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert all("step" in json.loads(ln) for ln in lines if ln.endswith("}"))  # readers may rely on it
    assert [(e["attempt"], e["start_step"]) for e in read_events(run_dir)] == [("a", 0), ("b", 10), ("c", 20)]
    assert "start" in hist[0] and "start" not in hist[1]
    assert read_history(run_dir + "/") == hist
    uri = f"file://{tmp_path}/uri-run"  # a URI run dir: pyarrow's filesystem, where it can append
    for s in (1, 2):
        MetricsHistory(uri, "L", f"x{s}").append({"step": s, "start_step": s - 1, "loss": 1.0})
    assert [r["step"] for r in read_history(uri)] == [1, 2] and read_history(uri + "x") == []


def test_start_events_size_history_and_restart_cost(tmp_path, monkeypatch):
    """A run that loses a worker, grows back, then is relaunched to train further: each
    start's event dates the failure by the previous group's heartbeat and counts the steps
    lost; the size history keeps the steps each group owns in the final trajectory."""
    import launcher.run.records as rl

    run_dir = str(tmp_path / "run")
    clock = {"t": 1000.0}
    monkeypatch.setattr(rl.time, "time", lambda: clock["t"])

    def group(launch, attempt, world, start, last, first_step_at, done=False):
        previous = Heartbeat.read(run_dir)
        ev = start_event(previous, start_step=start, world_size=world, first_step_time=first_step_at,
                         launch_id=launch, resumed_from=None if start == 0 else f"step-{start}")
        history = MetricsHistory(run_dir, launch, attempt)
        history.event(ev)
        hb = Heartbeat(run_dir, {"launch_id": launch, "attempt": attempt}, world)
        for s in range(start + 1, last + 1):
            clock["t"] += 0.5
            history.append({"step": s, "start_step": start, "loss": 1.0, "world_size": world})
            hb.beat(s, force=True, done=done and s == last)
        return ev

    ev = [group("L1", "a", 2, 0, 22, 1000.0)]            # dies after step 22; checkpoint at 20
    clock["t"] += 30.0                                     # 30 s to the first step on 1 worker
    ev.append(group("L1", "b", 1, 20, 78, clock["t"]))    # grows back after 78; checkpoint at 70
    clock["t"] += 18.0
    ev.append(group("L1", "c", 2, 70, 100, clock["t"], done=True))
    clock["t"] += 3600.0                                   # relaunched an hour later, with more steps
    ev.append(group("L2", "d", 2, 100, 120, clock["t"]))
    assert read_events(run_dir) == [{**e, "launch_id": launch, "attempt": a}
                                    for e, launch, a in zip(ev, "L1 L1 L1 L2".split(), "abcd", strict=True)]
    assert ev[0]["restart_s"] is None and ev[0]["previous_step"] is None
    assert (ev[1]["restart_s"], ev[1]["steps_lost"], ev[1]["previous_world_size"]) == (30.0, 2, 2)
    assert (ev[2]["restart_s"], ev[2]["steps_lost"], ev[2]["previous_world_size"]) == (18.0, 8, 1)
    assert ev[3]["after_finish"] and ev[3]["relaunch"] and ev[3]["restart_s"] is None
    assert size_history(ev[:3], 100) == [(1, 20, 2), (21, 70, 1), (71, 100, 2)]
    assert size_history(ev, 120) == [(1, 20, 2), (21, 70, 1), (71, 120, 2)]
    assert format_sizes(size_history(ev, 120)) == "steps 1-20 on 2 workers, 21-70 on 1 worker, 71-120 on 2 workers"
    # a start from an older checkpoint (the newest was damaged): the steps after it were re-trained
    assert size_history([*ev[:3], {"start_step": 50, "world_size": 1}], 120) == [(1, 20, 2), (21, 120, 1)]
    assert describe_start(ev[0]) == "started on 2 workers at step 0"
    assert describe_start(ev[1]) == ("restarted on 1 worker (was 2) after step 22: resumed from step 20 "
                                     "(2 steps lost); 30.0 s from the failure to the next trained step")
    assert describe_start(ev[3]) == "continued a finished run on 2 workers from step 100"
    sizes = {r["step"]: r["world_size"] for r in read_history(run_dir)}  # the steps kept
    assert [sizes[s] for s in (20, 21, 70, 71, 120)] == [2, 1, 1, 2, 2]


def test_heartbeat_is_throttled_and_forced(tmp_path):
    hb = Heartbeat(str(tmp_path), {"launch_id": "L", "attempt": "a"}, 2)
    assert Heartbeat.read(str(tmp_path)) is None
    hb.beat(1)
    hb.beat(2)  # within HEARTBEAT_S of the first: skipped
    assert Heartbeat.read(str(tmp_path))["step"] == 1
    hb.beat(3, force=True)
    rec = Heartbeat.read(str(tmp_path))
    assert (rec["step"], rec["world_size"], rec["attempt"], rec["done"]) == (3, 2, "a", False)
    (tmp_path / ".sharded_ams" / "heartbeat.json").write_text('{"step": "x"')
    assert Heartbeat.read(str(tmp_path)) is None  # unreadable: no restart cost, no crash
    assert not Heartbeat("s3://bucket/run", {}, 1).enabled


def test_run_summary_shows_sizes_and_restarts():
    pytest.importorskip("ray.train")
    from launcher.run.driver import RunResult

    ev = {"start_step": 20, "world_size": 1, "previous_world_size": 2, "previous_step": 22, "relaunch": False,
          "after_finish": False, "restart_s": 31.25, "steps_lost": 2}
    res = RunResult(name="r", run_dir="/x", start_step=0, step=100, steps=100, train_loss=2.0, val_loss=2.1,
                    restarts=2, wall_time_s=60.0, checkpoint="/x/step-00000100", num_workers=[1, 2], use_gpu=False,
                    size_history=[(1, 20, 2), (21, 70, 1), (71, 100, 2)], restart_events=[ev])
    text = res.summary()
    assert "workers     1-2 x CPU (gloo): steps 1-20 on 2 workers, 21-70 on 1 worker, 71-100 on 2 workers" in text
    assert "restarts    2 in this launch" in text
    assert "restarted on 1 worker (was 2) after step 22: resumed from step 20 (2 steps lost); 31.2 s" in text


def test_run_summary_counts_the_launch_from_its_own_start():
    """After a restart, "this launch trained" starts where the launch did, not where its last
    worker group resumed (RunResult.start_step)."""
    pytest.importorskip("ray.train")
    from launcher.run.driver import ResumePoint, RunResult

    def summary(resumed_from: ResumePoint, step: int = 8) -> str:
        return RunResult(name="r", run_dir="/x", start_step=2, step=step, steps=8, train_loss=2.0, val_loss=None,
                         restarts=1, wall_time_s=9.0, checkpoint=None, num_workers=2, use_gpu=False,
                         resumed_from=resumed_from).summary()

    assert "steps       8/8 (this launch trained steps 0 -> 8)" in summary(ResumePoint())
    assert "(this launch trained steps 4 -> 8)" in summary(ResumePoint("scan", "/x/step-00000004", 4))
    assert "nothing left to train" in summary(ResumePoint("ray", "/x/step-00000008", 8))


def test_skipped_steps_are_said_in_the_progress_line_and_the_summary():
    """lr 1e4 on the tiny GPT: every step after the first few skipped (NaN gradients), and
    the progress read "loss 1.8e9 ... grad norm nan" like a run that trains."""
    pytest.importorskip("ray.train")
    from launcher.run.driver import RunResult
    from launcher.train.loop import _progress_line

    m = {"step": 20, "loss": 1.5, "tokens_per_s": 10.0, "step_time_ms": 1.0, "lr": 1e-3,
         "grad_norm": float("nan"), "world_size": 2}
    assert "skipped" not in _progress_line({**m, "skipped_steps": 0}, 60)
    assert "grad norm nan | 17 steps skipped (non-finite grads) | 2 workers" in \
        _progress_line({**m, "skipped_steps": 17}, 60)

    def summary(skipped: int) -> str:
        return RunResult(name="r", run_dir="/x", start_step=0, step=60, steps=60, train_loss=2.0,
                         val_loss=None, restarts=0, wall_time_s=9.0, checkpoint=None, num_workers=2,
                         use_gpu=False, metrics={"skipped_steps": skipped}).summary()

    assert "skipped" not in summary(0)
    lines = summary(51).splitlines()
    assert lines[4] == ("[sharded-ams]   skipped     51 step(s) of the run: a gradient was NaN/inf "
                        "on some rank, so the params did not move (a diverged run?)"), lines


def test_ray_log_filter():
    """Routine and repeated Ray lines are hidden, a failure keeps its short form."""
    for noise in ("Failed to query Ray Train Controller actor state. State API may be temporarily",
                  "Reporting training result 3: TrainingReport(...)",
                  "Traceback (most recent call last):",
                  '  File "/x/train_fn.py", line 273, in train_loop',
                  "    ^^^^^^^^^^^^",
                  "committed checkpoint /tmp/sharded-ams-ckpt-abc123 (step 20)",
                  "Did not detect any changes in the cluster resources. Training will continue with the same",
                  "Detected ready resources for 2 workers in the cluster. Deciding to start/restart training",
                  "    [state-dump] NodeManager:", "[state-dump] ClusterResources:",
                  "[2026-11-28 09:45:51,225 I 12107 12107] (raylet) accessor.cc:475: Received address",
                  "Error in control loop iteration: The worker group startup timed out after 10.0 seconds"):
        assert filter_line(noise) is None, noise
    for keep in ("[FailurePolicy] RETRY", "  Error count: 1 (max allowed: 3)",
                 "RuntimeError: Connection closed by peer", "my own print from the train loop"):
        assert filter_line(keep) == keep
    for long, short in (
            ("The actor is dead because its worker process has died. Some common causes include: OOM",
             "The actor is dead because its worker process has died."),
            ("The worker group startup timed out after 10.0 seconds waiting for 2 workers. Potential causes "
             "include: (1) temporary", "The worker group startup timed out after 10.0 seconds waiting for 2 workers."),
            ("Detected changes in the cluster resources. Deciding to resize the worker group from 1 -> 2 workers.",
             None)):
        assert filter_line(long) == (short or long)


def test_an_elastic_run_waiting_for_its_workers_says_so():
    """Ray's elastic controller logs its wait every 30 s; hidden, the user saw nothing at all
    while the run waited (up to 3 minutes after a killed driver)."""
    shown = filter_line("Detected ready resources for 1 workers in the cluster. Deciding NOT to start/restart "
                        "training due to the number of workers falling below the minimum (min_workers=3).")
    assert shown.startswith("[sharded-ams] waiting for workers: Ray has room for 1 of the 3 this elastic run "
                            "needs to start"), shown


RAYLET_DIED = (
    "Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL by the user "
    "or system OOM killer. Last 20 lines of the Raylet logs:\n    [state-dump] \n    [state-dump] "
    "NodeManager:\n    [2026-11-28 09:45:51,225 I 12107 12107] (raylet) accessor.cc:475: Received\n")


def test_ray_error_messages_are_cut_short_unless_verbose():
    """A dead raylet's message (printed by Ray's error listener through print_to_stdstream)
    carries its last log lines, [state-dump] blocks: cut to its first sentence."""
    ray_worker = pytest.importorskip("ray._private.worker")
    assert filter_text(RAYLET_DIED) == "Raylet is terminated. Termination is unexpected."

    def emit(node: str) -> str:  # a message per node: Ray's own dedup hides a repeated one
        out = io.StringIO()
        with redirect_stdout(out):  # Ray's printer writes to sys.stdout as it is at the call
            ray_worker.print_to_stdstream({"lines": [RAYLET_DIED.replace("NodeManager", node)], "pid": "raylet",
                                           "is_err": False}, ignore_prefix=False)
        return out.getvalue()

    with quiet_ray_logs(enabled=True):
        shown = emit("alpha")
    assert "Raylet is terminated" in shown and "state-dump" not in shown and "accessor.cc" not in shown
    with quiet_ray_logs(enabled=False):  # --verbose: everything
        assert "[state-dump] beta" in emit("beta")
    assert "[state-dump] gamma" in emit("gamma")  # Ray's printer is back after the block
