"""The GPU check's record: ``gpu_check.json`` written first (atomically, after every
section), then ``gpu_check.md`` built from that JSON's text, one section at a time, so a
formatter that raises costs its own table and nothing else (issue 21: the one GPU run must
not lose its numbers to a report bug)."""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path

from bench_common import markdown_table
from bench_gpu import COLUMNS as BW_COLUMNS
from bench_gpu import HEADERS as BW_HEADERS


def write_report(report: dict, out: str) -> str:
    """Write ``gpu_check.json`` (first: it holds every number) then ``gpu_check.md``;
    returns the markdown."""
    text = json.dumps(report, indent=2, default=str) + "\n"
    _atomic_write(Path(out, "gpu_check.json"), text)
    md = markdown(json.loads(text))
    _atomic_write(Path(out, "gpu_check.md"), md + "\n")
    return md


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    """The tables of a report (as read back from its JSON). Each section is formatted on its
    own: an error in one becomes a line in its place."""
    secs = report.get("sections", {})
    lines = _header(report)
    for name, res in secs.items():
        try:
            lines += FORMATTERS.get(name, _section_rows)(name, res)
        except Exception:  # noqa: BLE001 - the other sections and the JSON are unaffected
            err = traceback.format_exc().strip().splitlines()[-1]
            lines += ["", (f"## {name}: the report could not format this section ({err}); "
                           "its numbers are in gpu_check.json")]
    pytest_summary = secs.get("pytest", {}).get("summary")
    if pytest_summary:
        lines += ["", f"pytest: `{pytest_summary}`"]
    return "\n".join(lines)


def _header(report: dict) -> list[str]:
    secs = report.get("sections", {})
    env = secs.get("env", {}).get("info", {})
    state = report.get("state", "PASSED" if report.get("passed") else "FAILED")
    lines = [f"# gpu_check on {env.get('device', report.get('device'))}", "",
             (f"torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
              f"driver {env.get('driver', 'n/a')}, git {env.get('git_sha')}, {env.get('date')}; "
              f"{state} in {report.get('seconds', 0):.0f} s "
              f"(time limit {report.get('time_limit_s', 0):.0f} s)"), "",
             "| section | status | seconds | cap s |", "|---|---|---:|---:|"]
    caps = report.get("caps", {})
    lines += [f"| {n} | {r.get('status')} | {r.get('seconds', 0):.1f} | {caps.get(n, '')} |"
              for n, r in secs.items()]
    return lines


def _section_rows(name: str, res: dict) -> list[str]:
    lines: list[str] = []
    if res.get("status") == "error":
        lines += ["", f"## {name}: error", "", "```", str(res.get("error", ""))[-1500:], "```"]
    rows = res.get("rows")
    if not rows:
        if res.get("reason"):
            lines += ["", f"## {name}: {res['status']} ({res['reason']})"]
        return lines
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return lines + ["", f"## {name}", "", markdown_table(rows, cols)]


def _bandwidth(name: str, res: dict) -> list[str]:
    lines = _section_rows(name, {k: v for k, v in res.items() if k != "rows"})
    if res.get("rows"):
        lines += ["", f"## {name}", "", markdown_table(res["rows"], BW_COLUMNS, BW_HEADERS)]
    if res.get("targets"):
        lines += ["", markdown_table(res["targets"], ["n", "target", "value", "met"])]
    if res.get("note"):
        lines += ["", res["note"]]
    return lines


def _step(name: str, res: dict) -> list[str]:
    lines = _section_rows(name, {k: v for k, v in res.items() if k != "rows"})
    if res.get("table"):
        lines += ["", f"## {name}", "", res["table"]]
    if res.get("targets"):
        lines += ["", markdown_table(res["targets"], ["row", "target", "value", "met"])]
    if res.get("note"):
        lines += ["", res["note"]]
    return lines


#: per-section formatters (the rest: every row's keys as columns)
FORMATTERS: dict[str, Callable[[str, dict], list[str]]] = {"bandwidth": _bandwidth,
                                                           "step": _step}
