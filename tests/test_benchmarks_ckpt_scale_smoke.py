"""Smoke test of benchmarks/bench_ckpt_scale.py: small world sizes and a scaled-down
layout, every row present in the JSON. No timing assertions (timings on shared CI machines
mean nothing); the counted bytes of a save are asserted, they do not depend on the machine."""

from __future__ import annotations

import json

from scripts import load_script


def test_bench_ckpt_scale_smoke(tmp_path, capsys):
    bench = load_script("benchmarks/bench_ckpt_scale.py")
    out = tmp_path / "bench_ckpt_scale.json"
    bench.main(["--world-sizes", "2", "5", "--scale", "0.02", "--save-scale", "0.01",
                "--out", str(out)])
    report = json.loads(out.read_text())
    plan = report["plan"]
    assert [r["world_size"] for r in plan] == [2, 5]
    for r in plan:
        assert r["buckets"] > 1 and r["pieces"] >= r["buckets"]
        assert r["ranks_timed"] == len(r["plan_ms"]) == min(r["world_size"], 3)
        assert r["plan_ms_per_rank"] > 0 and r["read_manifest_s"] > 0
        assert 1 <= r["needed_files"] <= r["verify_files"]
    save = report["save"]
    assert [r["case"] for r in save] == [c[0] for c in bench.SAVE_CASES]
    for r in save:
        # state_dict() copies straight to the host: nothing derived from the state
        assert r["device_bytes"] == 0 and r["gb_7b_n8"] == 0, r["device_ops"]
        assert r["host_bytes"] == r["state_bytes"] > 0
    assert save[1]["state_bytes"] / save[1]["local_elements"] == 16  # m, v, s, master
    for key in ("device", "torch", "git_sha", "date", "world_sizes", "bucket_numel"):
        assert key in report["meta"]
    assert "| world_size |" in capsys.readouterr().out
