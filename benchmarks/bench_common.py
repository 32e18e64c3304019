"""What every benchmark shares: the environment tag, the Markdown table and the JSON file."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
RECORD_DIR = ROOT / "benchmarks" / "results"  # the recorded results RESULTS.md cites
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def git_sha() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: Optional[torch.device] = None) -> str:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"cpu: {cpu} ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)"


def loadavg() -> Optional[float]:
    """The 1-minute load average: other processes skew CPU timings (recorded, not fixed)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def env_info(device: Optional[torch.device] = None) -> dict[str, Any]:
    """Device, versions, git SHA, date and load: the tag every result carries."""
    return {"device": device_name(device), "torch": torch.__version__,
            "python": platform.python_version(), "git_sha": git_sha(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(), "load_average_1m": loadavg()}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if v is None:
        return "n/a"
    return str(v)


def markdown_table(rows: Sequence[dict], cols: Sequence[str], headers: Optional[dict] = None) -> str:
    headers = headers or {}
    out = ["| " + " | ".join(headers.get(c, c) for c in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def print_table(rows: Sequence[dict], cols: Sequence[str], headers: Optional[dict] = None) -> None:
    print(markdown_table(rows, cols, headers), flush=True)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def add_out_args(ap: argparse.ArgumentParser, filename: str) -> None:
    """``--out`` and ``--update-record``: a run writes into a fresh run directory unless asked
    to replace the recorded result that RESULTS.md cites."""
    ap.add_argument("--out", default=None,
                    help=f"JSON output (default: benchmarks/results/runs/<UTC time>/{filename})")
    ap.add_argument("--update-record", action="store_true",
                    help=f"write benchmarks/results/{filename}, the recorded result (RESULTS.md)")


def resolve_out(out: Optional[str], update_record: bool, filename: str,
                now: Optional[_dt.datetime] = None) -> Path:
    """Where a run's JSON goes: ``--out``; the record with ``--update-record``; else a new
    ``benchmarks/results/runs/<UTC time>/`` (git-ignored), so a run never overwrites the record."""
    if out:
        return Path(out)
    if update_record:
        return RECORD_DIR / filename
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return RECORD_DIR / "runs" / stamp / filename


def step_keeping_grads(opt):
    """``opt.step`` on the same gradients every time: step() consumes ``p.grad`` (it is None
    afterwards), so each p.grad is pointed back at its buffer view (no copy), as
    ``zero_grad()`` + backward would leave it."""
    pairs = [(p, v) for sh in opt.shards for p, v in zip(sh.buf.params, sh.buf.grad_views)]

    def step():
        opt.step()
        for p, view in pairs:
            p.grad = view
    return step
