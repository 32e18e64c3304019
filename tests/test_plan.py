"""``sharded-ams plan`` (issue 22): its numbers against what is measured here.

* parameter counts of the built-in Llama 3 shapes against Meta's published totals;
* bytes of params, grads and optimizer state per rank, predicted, against the tensors a
  real ``ShardedAMS`` (zero1) and ``fully_shard`` + ``AMS`` (fsdp) allocate on 2 and 4 gloo
  ranks (one spawn per world size, every model and strategy inside it; see plan_measure.py);
* activation bytes, predicted, against the bytes autograd keeps for backward (saved-tensor
  hooks, one storage counted once), with and without activation checkpointing;
* the published per-parameter formulas (Megatron-Core's distributed optimizer) at scale;
* the command line: one-line errors with exit 2, stable JSON keys, and a zero1 command
  whose ``--set`` items pass the launcher's config checks;
* ``--layout-report`` on a small case, against the loader's own ``needed_shards``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import plan_measure
from dist_utils import run_distributed
from launcher.cli import main
from launcher.plan import memory
from launcher.plan.model import load_model

ROOT = Path(__file__).resolve().parent.parent

SIZES = ("tiny", "60m", "130m")
#: the issue asks for activations within 20%; the count is tensor by tensor and lands within
#: 0.5%, so 5% here, which also catches a term left out (e.g. the fp32 copy in each norm)
ACT_TOL = 0.05


def test_llama3_parameter_counts_are_the_published_ones():
    # Meta's model cards: Llama 3 8B has 8.03B parameters, Llama 3 70B 70.6B
    assert f"{load_model('llama3-8b', 8192).num_params / 1e9:.2f}" == "8.03"
    assert f"{load_model('llama3-70b', 8192).num_params / 1e9:.1f}" == "70.6"
    spec = load_model("llama3-8b", 8192)
    assert spec.shape["vocab_size"] == 128256 and spec.shape["n_kv_head"] == 8
    assert spec.shape["rope_theta"] == 500000.0 and not spec.shape["tie_weights"]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"N{n}")
def measured(request):
    n = request.param
    return n, run_distributed(plan_measure.measure_rank, n, SIZES, timeout=400)


#: the issue asks for model-state bytes within 1%; the plan builds the same layout (zero1) and
#: the same dim-0 chunks (fsdp) as the real runs, so they are equal to the byte
STATE_TOL = 0.0


def _close(pred: float, got: float, tol: float) -> bool:
    return abs(pred - got) <= tol * got


@pytest.mark.slow
def test_predicted_model_state_bytes_equal_real_runs(measured):
    n, ranks = measured
    prec = {"fp32": memory.precision("fp32"), "bf16": memory.precision("bf16")}
    for size in SIZES:
        spec = load_model(size, plan_measure.SEQ, plan_measure.VOCAB)
        for rank, got in enumerate(ranks):
            for p in ("fp32", "bf16"):
                if (size, "zero1", p) not in got:
                    continue
                real = got[(size, "zero1", p)]
                pred = memory.zero1_memory(spec, n, 1, prec[p], bucket_numel=real["bucket_numel"])
                for key in ("params", "grads", "optimizer"):
                    assert _close(pred[key], real[key], STATE_TOL), (size, "zero1", p, rank, key, pred[key], real[key])
            real = got[(size, "fsdp", "fp32")]
            pred = memory.fsdp_memory(spec, n, 1, prec["fp32"], rank=rank)
            for key in ("params", "grads", "optimizer"):
                assert _close(pred[key], real[key], STATE_TOL), (size, "fsdp", rank, key, pred[key], real[key])


@pytest.mark.slow
def test_predicted_unsharded_grads_of_fsdp_accumulation_equal_real_runs(measured):
    """With gradient sync off between micro-batches (``parallel.grad_sync = "step"``) each
    rank holds the whole model's unsharded gradients in the reduce dtype (FSDP2 accumulates
    bf16 params' gradients in an fp32 reduce dtype); with ``"micro_batch"`` none."""
    n, ranks = measured
    spec = load_model(SIZES[0], plan_measure.SEQ, plan_measure.VOCAB)
    for rank, got in enumerate(ranks):
        for p, reduce in plan_measure.HELD_CASES:
            pred = memory.fsdp_memory(spec, n, 1, memory.precision(p, reduce), held_grads=True)
            real = got[(SIZES[0], "fsdp-held", p, reduce, "step")]
            assert real > 0 and pred["held_grads"] == real, (p, reduce, rank, pred["held_grads"], real)
            assert got[(SIZES[0], "fsdp-held", p, reduce, "micro_batch")] == 0, (p, reduce, rank)


def test_fsdp_weighs_both_grad_syncs_and_its_command_says_which(capsys):
    """Under accumulation both fsdp modes are candidates: per step holds the unsharded
    gradients (and reduces 1/accum as much), per micro-batch does not; a ranked command
    sets parallel.grad_sync only for the latter, and the launcher's config takes it."""
    from launcher.config import load_config

    rc, out, _ = _run(capsys, "--model", "llama3-8b", "--gpus", "64", "--json")
    plan = json.loads(out)
    fsdp = {(c["grad_sync"], c["activation_checkpointing"]): c for c in plan["ranked"]
            if c["strategy"] == "fsdp" and c["tp"] == 2}
    step, micro = fsdp[("step", False)], fsdp[("micro_batch", False)]
    accum = step["accumulation_steps"]
    assert accum > 1 and micro["memory"]["held_grads"] == 0
    assert step["memory"]["held_grads"] == pytest.approx(4 * load_model("llama3-8b", 8192).num_params / 2, rel=1e-3)
    assert step["memory"]["total"] - micro["memory"]["total"] == step["memory"]["held_grads"]
    rs = step["comm_bytes"]["dp"]["reduce_scatter"], micro["comm_bytes"]["dp"]["reduce_scatter"]
    assert rs[1] == pytest.approx(accum * rs[0])
    for cand, want in ((step, "step"), (micro, "micro_batch")):
        words = cand["command"].split()
        sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
        assert ("parallel.grad_sync=micro_batch" in sets) == (want == "micro_batch")
        assert load_config(words[2], sets).parallel.grad_sync == want
    # the column keeps the launcher's default where it fits, and says so in its verdict
    assert plan["strategies"]["fsdp"]["verdict"] in (
        "fits", "fits with checkpointing", "fits with grad sync per micro-batch",
        "fits with checkpointing and grad sync per micro-batch")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_predicted_activations_match_saved_tensor_bytes(size, dtype):
    batch, seq, vocab = 2, 64, plan_measure.VOCAB
    model = plan_measure.build(size, dtype, seq=seq, init=False)
    got = plan_measure.saved_activation_bytes(model, batch, seq, vocab)
    spec = load_model(size, seq, vocab)
    act = 4 if dtype == torch.float32 else 2
    pred = memory.activation_memory(spec, batch * seq, act, checkpointing=False)["saved"]
    assert _close(pred, got, ACT_TOL), (pred, got)


def test_predicted_activations_with_checkpointing_match():
    """With checkpointing the hooks see what lives outside the blocks and what the
    checkpoints keep; the blocks' inputs (kept for the recompute) are added from forward
    pre-hooks where the hooks did not see them (union by storage), and one block recomputed
    in backward is measured alone: the activations at their peak during backward."""
    batch, seq, vocab = 2, 64, plan_measure.VOCAB
    model = plan_measure.build("60m", torch.bfloat16, seq=seq, init=False)
    model.activation_checkpointing = True
    inputs: dict[int, int] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a: inputs.__setitem__(a[0].untyped_storage().data_ptr(),
                                        a[0].untyped_storage().nbytes()))
        for layer in model.model.layers]
    outside = plan_measure.saved_storages(model, batch, seq, vocab)
    for h in hooks:
        h.remove()
    model.activation_checkpointing = False
    one_layer = _one_layer_saved(model, batch, seq)
    got = sum({**outside, **inputs}.values()) + one_layer
    spec = load_model("60m", seq, vocab)
    pred = memory.activation_memory(spec, batch * seq, 2, checkpointing=True)["saved"]
    assert _close(pred, got, ACT_TOL), (pred, got)


def _one_layer_saved(model, batch: int, seq: int) -> int:
    layer = model.model.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(batch, seq, model.cfg.n_embd, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = model.model.rope_cos[:seq].to(x.dtype), model.model.rope_sin[:seq].to(x.dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, cos, sin)
    return sum(seen.values())


def test_zero1_bytes_per_param_are_megatron_cores():
    """Megatron-Core's distributed optimizer, bf16 params with fp32 grads: 6 + 12/d bytes per
    parameter (docs.nvidia.com/megatron-core/developer-guide/latest/distrib_optimizer.html);
    fp32: 8 + 8/d. The layout's padding is the only difference."""
    spec = load_model("llama3-8b", 8192)
    for prec, per in (("bf16", lambda d: 6 + 12 / d), ("fp32", lambda d: 8 + 8 / d)):
        for d in (8, 64):
            mem = memory.zero1_memory(spec, d, 1, memory.precision(prec), bucket_numel=6_553_600)
            got = (mem["params"] + mem["grads"] + mem["optimizer"]) / spec.num_params
            assert got == pytest.approx(per(d), rel=0.002), (prec, d, got)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("argv, needle", [
    (("--model", "llama3-9b", "--gpus", "8"), "unknown model 'llama3-9b'"),
    (("--model", "60m", "--gpus", "6", "--tp", "3", "--seq", "1024",
      "--global-batch-tokens", "6144"), "--tp 3 does not divide the model's n_head (8)"),
    (("--model", "60m", "--gpus", "8", "--tp", "1", "--seq", "1024", "--global-batch-tokens", "12288"),
     "does not split into 8 data-parallel ranks x micro-batches of 1 (--global-batch-tokens "
     "8_192 or 16_384 would)"),
    (("--model", "60m", "--gpus", "8", "--tp", "1", "--seq", "1024", "--global-batch-tokens", "4096"),
     "(--global-batch-tokens 8_192 would)"),
    (("--model", "60m", "--gpus", "8", "--seq", "1000", "--global-batch-tokens", "8192"),
     "is not a multiple of --seq 1000"),
    (("--model", "no/such.toml", "--gpus", "8"), "no such config file"),
    (("no/such.toml", "--gpus", "8"), "no such config file"),
    (("60m", "--model", "1b", "--gpus", "8"), "two models given: '60m' and --model '1b'"),
    (("--gpus", "8"), "a model (MODEL or --model"),
    (("60m",), "and --gpus are required"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sharded-ams plan: error: ") and needle in err, err


def test_the_model_may_be_given_as_train_takes_its_config(capsys):
    """``plan CONFIG`` (positional, as ``train CONFIG``) is ``plan --model CONFIG``."""
    config = str(ROOT / "launcher" / "configs" / "llama_60m.toml")
    by_flag = _run(capsys, "--model", config, "--gpus", "8", "--json")
    assert by_flag[0] == 0
    assert _run(capsys, config, "--gpus", "8", "--json") == by_flag
    assert _run(capsys, config, "--model", config, "--gpus", "8", "--json") == by_flag


def test_a_config_file_gives_the_runs_own_shape_and_flags_override_it(capsys, tmp_path):
    """Planning a job config plans that run: its sequence length, global batch (in
    sequences), micro-batch, precision, reduction dtype and optimizer's beta3, unless a
    flag says otherwise; the commands it prints keep them."""
    config = str(ROOT / "launcher" / "configs" / "llama_130m.toml")  # 512 x 256, micro 64
    rc, out, _ = _run(capsys, config, "--gpus", "8", "--json")
    assert rc == 0
    plan = json.loads(out)
    inp = plan["inputs"]
    assert (inp["seq"], inp["global_batch_tokens"], inp["micro_batch"]) == (256, 512 * 256, 64)
    assert (inp["precision"], inp["grad_reduce"], inp["beta3"]) == ("bf16-autocast", "fp32", 0.0)
    assert plan["from_config"]["batch_sequences"] == 512
    command = plan["ranked"][0]["command"]
    assert "--set data.block_size=256 --set data.batch_size=512 --set data.micro_batch_size=64" in command
    # flags win; the config's 512 sequences are of the flag's length
    rc, out, _ = _run(capsys, config, "--gpus", "8", "--seq", "1024", "--micro-batch", "8",
                      "--precision", "bf16", "--json")
    inp = json.loads(out)["inputs"]
    assert (inp["seq"], inp["global_batch_tokens"], inp["micro_batch"], inp["precision"]) == \
        (1024, 512 * 1024, 8, "bf16")
    # an optimizer with beta3 > 0 keeps s: planned from the config too
    text = (ROOT / "launcher" / "configs" / "llama_130m.toml").read_text()
    assert 'preset = "grams"' in text
    (tmp_path / "b3.toml").write_text(text.replace('preset = "grams"', 'preset = ""\nbeta3 = 0.9'))
    rc, out, err = _run(capsys, str(tmp_path / "b3.toml"), "--gpus", "8", "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert plan["inputs"]["beta3"] == 0.9
    assert all(s["memory"]["optimizer.exp_avg_s"] > 0 for s in plan["strategies"].values())
    # a size name: the built-in defaults, nothing from a config
    rc, out, _ = _run(capsys, "60m", "--gpus", "8", "--json")
    plan = json.loads(out)
    assert (plan["inputs"]["seq"], plan["inputs"]["global_batch_tokens"], plan["from_config"]) == \
        (8192, 4 * 1024 * 1024, {})


def test_json_has_stable_keys_per_strategy(capsys):
    rc, out, _ = _run(capsys, "--model", "llama3-8b", "--gpus", "64", "--json")
    assert rc == 0
    plan = json.loads(out)
    assert set(plan["strategies"]) == {"zero1", "fsdp"}
    for s in plan["strategies"].values():
        for key in ("params", "grads", "optimizer", "activations", "total"):
            assert isinstance(s["memory"][key], int) and s["memory"][key] > 0
        assert s["memory"]["total"] >= sum(s["memory"][k] for k in ("params", "grads", "optimizer",
                                                                     "activations", "held_grads"))
        assert s["comm_bytes"]["dp"]["reduce_scatter"] > 0 and s["step_time_s"] > 0
        assert s["verdict"] in ("fits", "fits with checkpointing", "does not fit",
                                "fits with grad sync per micro-batch",
                                "fits with checkpointing and grad sync per micro-batch")
    assert plan["ranked"] and all(c["fits"] for c in plan["ranked"])


def test_the_zero1_command_passes_the_launchers_config_checks(capsys):
    from launcher.config import load_config

    rc, out, _ = _run(capsys, "--model", "llama3-8b", "--gpus", "64", "--strategy", "zero1",
                      "--tp", "1", "--json")
    cand = json.loads(out)["strategies"]["zero1"]
    assert cand["runnable"] and cand["command"].startswith("sharded-ams train ")
    words = cand["command"].split()
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = load_config(words[2], sets)
    assert (cfg.model.size, cfg.model.n_layer, cfg.model.vocab_size) == ("llama3-8b", 32, 128256)
    assert cfg.data.batch_size * cfg.data.block_size == 4 * 1024 * 1024
    assert cfg.model.activation_checkpointing == cand["activation_checkpointing"]


@pytest.mark.parametrize("strategy", ["fsdp", "zero1"])
def test_tp_rows_are_launcher_commands(capsys, strategy):
    from launcher.config import load_config

    rc, out, _ = _run(capsys, "--model", "llama3-70b", "--gpus", "256", "--tp", "8", "--json")
    cand = json.loads(out)["strategies"][strategy]
    assert rc == 0 and cand["runnable"] and "parallel_table" not in cand
    words = cand["command"].split()
    cfg = load_config(words[2], [words[i + 1] for i, w in enumerate(words) if w == "--set"])
    assert (cfg.parallel.strategy, cfg.parallel.tp) == (strategy, cand["tp"]) and cand["tp"] == 8


def test_layout_report_agrees_with_the_loaders_needed_shards():
    from launcher.plan.machinery import layout_report

    rep = layout_report(load_model("60m", 1024), 16)
    assert rep["reshard"]["needed_shards_agrees"]
    assert rep["checkpoint"]["files"] == 16 + 3
    assert rep["layout"]["pieces_total"] >= 16 * rep["layout"]["buckets"]
    assert 1 <= rep["reshard"]["files_per_new_rank"]["max"] <= 16


def test_readme_plan_block():
    """The README's plan lines run as written (``sharded-ams`` as ``python -m launcher``)
    and say what the README says they say."""
    import os
    import subprocess
    import sys

    from test_readme import bash_blocks

    lines = [ln.split("#")[0].strip() for ln in
             bash_blocks()[("Plan a run: `sharded-ams plan`", 0)].splitlines() if ln.strip()]
    outs = []
    for line in lines:
        assert line.startswith("sharded-ams plan ")
        argv = [sys.executable, "-m", "launcher", *line.split()[1:]]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout)
    assert "fits with AC" in outs[0] and "4,477" in outs[0] and "5,775" in outs[0]
    assert "1. fsdp dp64 tp1 + grad sync per micro-batch: 5,775 tokens/s" in outs[0]
    assert "sharded-ams train launcher/configs/llama_130m.toml" in outs[0]
    plan = json.loads(outs[1])
    assert plan["gpu"]["name"] == "h200-141gb" and plan["strategies"]["fsdp"]["tp"] == 8
    assert outs[2].startswith("from launcher/configs/llama_130m.toml (flags override): seq 256, ")
    assert "precision bf16-autocast" in outs[2].splitlines()[0]
