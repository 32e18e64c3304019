"""The xdist schedule of tests/conftest.py names real files, and every file that uses the
spawned ZeRO-1 jobs cached in one process (sharded_common) runs in their one group."""

from __future__ import annotations

import re
from pathlib import Path

import conftest

TESTS = Path(__file__).resolve().parent


def test_scheduled_names_are_test_files():
    names = [n for n in conftest.LONGEST_FIRST if n != "zero1_jobs"] + list(conftest.SHARED_JOBS)
    assert [n for n in names if not (TESTS / n).is_file()] == []


def test_users_of_the_cached_jobs_share_one_group():
    users = {p.name for p in TESTS.glob("test_*.py")
             if re.search(r"\b(proof_results|features|cached_job)\(", p.read_text())}
    assert users and {conftest.group_of(n) for n in users} == {"zero1_jobs"}, users


def test_scope_of_a_node_id_is_its_group():
    assert conftest.group_of("test_overlap.py") == conftest.group_of("test_sharded.py") == "zero1_jobs"
    assert conftest.group_of("test_faults.py") == "test_faults.py"
