"""examples/toy_convex.py runs, writes its PNG and Grams lowers the objective."""

from __future__ import annotations

import torch

from scripts import load_script

def _load():
    return load_script("examples/toy_convex.py")


def test_toy_convex_runs(tmp_path, capsys):
    toy = _load()
    out = tmp_path / "sub" / "toy.png"
    res = toy.main(["--steps", "60", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["final"]) == {"Grams", "Adam", "C-Adam", "Lion", "C-Lion"}
    assert res["final"]["Grams"] < 0.5 * res["f0"]
    for name, losses in res["losses"].items():
        assert len(losses) == 61 and losses[-1] < res["f0"], name
    table = capsys.readouterr().out
    assert "| Grams | 0.01 |" in table and "| C-Lion | 0.001 |" in table


def test_lion_and_cautious_lion_step():
    toy = _load()
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    opt = toy.Lion([w], lr=0.1, betas=(0.9, 0.99))
    w.grad = torch.tensor([1.0, -1.0, 0.0, 2.0])
    opt.step()  # m = 0: c = 0.1 g, update = sign(g)
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9, 3.0, 0.4]))
    torch.testing.assert_close(opt.state[w]["exp_avg"], 0.01 * torch.tensor([1.0, -1.0, 0.0, 2.0]))
    # C-Lion: m points the other way on element 0 and 1; with a small g, c follows m there
    w2 = torch.nn.Parameter(torch.zeros(4))
    opt2 = toy.Lion([w2], lr=0.1, betas=(0.9, 0.99), cautious=True)
    opt2.state[w2]["exp_avg"] = torch.tensor([-1.0, 1.0, 1.0, 1.0])
    w2.grad = torch.tensor([0.1, -0.1, 0.1, 0.1])
    opt2.step()
    # elements 0, 1 disagree (sign(c) g < 0): held; 2, 3 kept and rescaled by 4 / 2
    torch.testing.assert_close(w2.detach(), torch.tensor([0.0, 0.0, -0.2, -0.2]))
