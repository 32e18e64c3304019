"""Helpers of the DCP checkpoint tests (test_dcp_checkpoint.py, test_dcp_convert.py)."""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from sharded_ams import AMS


def trained(seed: int = 0, width: int = 5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1))
    opt = AMS(model.parameters(), lr=1e-2, lam=0.0)
    for _ in range(2):
        model(torch.randn(3, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def rehash(path, name) -> None:
    """The manifest's size and sha256 of ``name`` made to match its bytes again (a
    tampered file that only a deeper check can catch)."""
    man = json.loads((path / "manifest.json").read_text())
    data = (path / name).read_bytes()
    man["files"][name].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / "manifest.json").write_text(json.dumps(man))


def copy_dir(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst
