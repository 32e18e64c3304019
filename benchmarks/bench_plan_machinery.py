"""The project's own machinery at up to 1,024 ranks, on paper (issue 22): the ZeRO-1 layout
and bucket plan, the checkpoint manifest and the reshard plan N -> 3N/4 for a Llama 3 70B
parameter list, with the project's pure functions (``launcher/plan/machinery.py``) and no
processes. Prints a table for benchmarks/RESULTS.md and, the JSON (a new run directory; --out, --update-record).

    python benchmarks/bench_plan_machinery.py --ranks 256 512 1024 [--model llama3-70b]

Seconds are single-process wall time on whatever machine runs it: they show how a cost
grows with N, not what a cluster node would take.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from bench_common import add_out_args, env_info, resolve_out, write_json  # noqa: E402
from launcher.plan.machinery import layout_report  # noqa: E402
from launcher.plan.model import load_model  # noqa: E402

COLUMNS = ("N", "layout build ms", "buckets", "pieces/rank (min..max)", "real elems/rank max/min",
           "pieces() all ranks s", "manifest MB", "files", "M", "old files per new rank (mean, max)",
           "GB read / GB kept per new rank", "needed_shards s/rank", "files_to_verify s/rank")


def row(rep: dict) -> list[str]:
    lay, ck, rs = rep["layout"], rep["checkpoint"], rep["reshard"]
    return [f"{rep['n']:,}", f"{lay['build_s'] * 1e3:.1f}", f"{lay['buckets']}",
            f"{lay['pieces_per_rank']['min']:.0f}..{lay['pieces_per_rank']['max']:.0f}",
            f"{lay['balance_max_over_min']:.3f}", f"{lay['pieces_all_ranks_s']:.1f}",
            f"{ck['manifest_bytes'] / 1e6:.1f}", f"{ck['files']:,}", f"{rep['m']:,}",
            f"{rs['files_per_new_rank']['mean']:.2f}, {rs['files_per_new_rank']['max']:.0f}",
            f"{rs['bytes_read_per_new_rank']['mean'] / 1e9:.2f} / "
            f"{rs['bytes_needed_per_new_rank']['mean'] / 1e9:.2f}",
            f"{rs['needed_shards_s_per_call']:.3f}", f"{rs['files_to_verify_s_per_rank']:.0f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-70b")
    ap.add_argument("--ranks", type=int, nargs="+", default=[256, 512, 1024])
    add_out_args(ap, "bench_plan_machinery.json")
    args = ap.parse_args(argv)
    spec = load_model(args.model, 8192)
    reports = [layout_report(spec, n) for n in args.ranks]
    print(f"{spec.name}: {spec.num_params:,} params in {len(spec.params)} tensors")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for rep in reports:
        print("| " + " | ".join(row(rep)) + " |")
    write_json(resolve_out(args.out, args.update_record, "bench_plan_machinery.json"),
               {"env": env_info(), "model": spec.name, "reports": reports})
    return 0


if __name__ == "__main__":
    sys.exit(main())
