"""examples/toy_convex.py: it runs, writes its PNG, and shows both regimes it claims."""

from __future__ import annotations

import torch

from scripts import load_script


def _load():
    return load_script("examples/toy_convex.py")


def test_toy_convex_regimes(tmp_path, capsys):
    toy = _load()
    out = tmp_path / "sub" / "toy.png"
    res = toy.main(["--steps", "250", "--lrs", "0.01", "0.1", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    low, high = res["losses"][0.01], res["losses"][0.1]
    assert set(low) == {"Grams", "Adam", "C-Adam", "Lion", "C-Lion"}
    for losses in (*low.values(), *high.values()):
        assert len(losses) == 251 and losses[-1] < res["f0"]
    # lr 0.01: Adam overshoots on w1 only, and late; the Grams and Adam curves stay within 1%
    ov = res["overshoot"][0.01]
    assert ov["w2"]["first_step"] is None and ov["w1"]["first_step"] > 50
    rel = max(abs(a - g) / max(a, g) for a, g in zip(low["Adam"], low["Grams"]))
    assert 0 < rel < 0.01  # not the same run (w1 differs), but not visibly apart either
    # lr 0.1: Adam's momentum overshoots both coordinates early; Grams is far ahead
    ov = res["overshoot"][0.1]
    assert ov["w1"]["first_step"] < 20 and ov["w2"]["first_step"] < 50
    reach = {n: r["steps_to_target"] for n, r in res["summary"][0.1].items()}
    assert reach["Grams"] is not None and reach["Adam"] is not None
    assert reach["Grams"] < 0.75 * reach["Adam"]
    assert high["Grams"][100] < 1e-3 * high["Adam"][100]
    text = capsys.readouterr().out
    assert "| Grams | 0.1 |" in text and "| C-Lion | 0.01 |" in text
    assert "lie on each other" in text and "Grams leaves Adam's curve" in text
    assert res["floor"] > 1e-20  # the plot is cut at fp32 rounding, not 1e-30


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
