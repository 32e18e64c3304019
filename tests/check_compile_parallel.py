"""A manual check, not collected by pytest (it costs ~30-45 s of compiling on 2 cores, past
the suite's budget): ``model.compile = true`` with ``strategy = "fsdp"`` (tp 1, 2 ranks),
with ``fsdp`` + ``tp = 2`` and with ``zero1`` + ``tp = 2`` (4 ranks; before the fixes in
``sharded_ams/buffers.py``'s ``offset_free`` and the launcher's one gather wait, its
compile crashed) trains through the launcher's own ``_build`` and
``_train_step`` (tests/test_parallel_launcher.py's config: C-Adam, a clip that binds,
2 micro-batches) to within fp32 rounding of the same run without compile, 3 steps; the
compiled runs twice, on a cold and then a warm Inductor cache (a fresh one per check): a
warm cache shared by the tp groups once handed ranks 0 and 1 the graph compiled for ranks
2 and 3 (``launcher/train/loop.py``, ``_per_rank_compile_cache``).

    PYTHONPATH=. python tests/check_compile_parallel.py

Prints the largest param difference per layout and exits 1 above ``TOL``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

from dist_utils import run_distributed  # noqa: E402

TOL = 1e-6  # measured 6.0e-8 (fsdp) and 4.5e-8 (fsdp + tp 2), torch 2.13 CPU
STEPS = 3


def _job(d: str, compiled: bool, tp: int, strategy: str):
    import test_parallel_launcher as T
    from launcher.train.loop import _build, _train_step

    cfg = T._config(os.path.join(d, f"run-{int(compiled)}-{tp}-{strategy}"), tp, strategy)
    cfg["model"]["compile"] = compiled
    torch.manual_seed(0)
    w = _build(cfg, device=torch.device("cpu"))
    for step in range(STEPS):
        _train_step(w, step)
    w.optimizer.finish_param_sync()  # zero1: the last gather may still be in flight
    return [T._full(p) for p in w.model.parameters()]


def main() -> int:
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="compile_par_") as d:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(d, "inductor")  # the ranks inherit it
        for strategy, world, tp in (("fsdp", 2, 1), ("fsdp", 4, 2), ("zero1", 4, 2)):
            eager = run_distributed(_job, world, d, False, tp, strategy, timeout=600)[0]
            for cache in ("cold", "warm"):
                comp = run_distributed(_job, world, d, True, tp, strategy, timeout=600)[0]
                diff = max(float((a - b).abs().max()) for a, b in zip(eager, comp))
                worst = max(worst, diff)
                print(f"{strategy}, {world} ranks, tp {tp}, {cache} cache: compiled vs eager "
                      f"max |diff| = {diff:.3g}", flush=True)
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
