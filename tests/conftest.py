"""How the suite spreads over pytest-xdist workers (``-n 2 --dist loadscope``, pyproject's
addopts; ``-n 0`` runs it in one process, e.g. for ``--pdb``).

Most of the slow tests wait: on Ray to notice a dead node, on a paced elastic run, on
spawned ranks. Two workers fill one test's waiting with another's work. Each test file is one
group (its module fixtures: a Ray cluster, a session, are built once, on one worker); the
files that share the spawned ZeRO-1 jobs of ``sharded_common.cached_job`` are one group, so
those jobs still run once. The longest groups go first: a long file started last would be
the suite's tail.
"""

from __future__ import annotations

import pytest

#: files sharing in-process results of spawned jobs (sharded_common.cached_job)
SHARED_JOBS = ("test_sharded.py", "test_sharded_features.py", "test_overlap.py")
#: the longest groups, longest first (idle 2-core durations); the rest follow in file order
LONGEST_FIRST = ("test_faults.py", "test_readme.py", "zero1_jobs", "test_optimizer_study.py",
                 "test_examples.py", "test_llm_e2e.py", "test_cluster_doc.py",
                 "test_parallel_launcher.py", "test_gpu_check.py", "test_plan.py",
                 "test_prepare_cluster.py", "test_llm_training.py")


def group_of(filename: str) -> str:
    return "zero1_jobs" if filename in SHARED_JOBS else filename


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest groups first; in file order otherwise (a stable sort)."""
    order = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: order.get(group_of(it.path.name), len(order)))


@pytest.hookimpl(optionalhook=True)  # without pytest-xdist (the GPU machine) not an error
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's scope scheduling with :func:`group_of` as the scope: a group runs whole on
    one worker, groups go out in collection order. (Not ``xdist_group`` marks: xdist 3.8
    tags them onto ``item._nodeid``, which pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid.split("::", 1)[0].rsplit("/", 1)[-1])

    return ByGroup(config, log)


# --- checkpoint fixtures (test_checkpoint_refusals.py, test_checkpoint_writes.py) -------


@pytest.fixture(scope="module")
def run_ckpts(tmp_path_factory):
    """A run dir with two committed checkpoints of one run (steps 1 and 2); read-only."""
    from ckpt_common import make_run_ckpts

    return make_run_ckpts(tmp_path_factory.mktemp("run"))


@pytest.fixture
def root(run_ckpts, tmp_path):
    """A copy of ``run_ckpts`` a test may damage."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_ckpts, dst)
    return dst

