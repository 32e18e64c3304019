"""The plan as text: one column per strategy, then the ranked configs with what runs them."""

from __future__ import annotations

GIB = float(1 << 30)


def _gib(b: float) -> str:
    return f"{b / GIB:.1f}"


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f}"


def _dur(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} days"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s:.3g} s"


def _rows(plan: dict) -> list[tuple[str, list[str]]]:
    cols = list(plan["strategies"].values())
    prec = plan["inputs"]["precision"]

    def m(key):
        return [_gib(c["memory"][key]) for c in cols]

    grad = "fp32" if plan["inputs"]["grad_reduce"] == "fp32" or prec != "bf16" else "bf16"
    return [
        ("MEMORY PER GPU (GiB)", [""] * len(cols)),
        (f"  params (zero1: {'bf16' if prec == 'bf16' else 'fp32'} buffer; fsdp: fp32 shards)",
         m("params")),
        (f"  grads (zero1: {grad} buffer; fsdp: fp32 shards)", m("grads")),
        ("  unsharded grads held (fsdp, sync per step)", m("held_grads")),
        ("  fp32 masters (zero1, bf16 params)", m("optimizer.master")),
        ("  m", m("optimizer.exp_avg")),
        ("  v", m("optimizer.exp_avg_sq")),
        ("  s (beta3 > 0)", m("optimizer.exp_avg_s")),
        ("  gathered params/grads (fsdp, transient)", m("gathered_transient")),
        ("  activations without checkpointing", m("activations_without_checkpointing")),
        ("  activations with checkpointing", m("activations_with_checkpointing")),
        ("  total (activations as chosen)", m("total")),
        ("  usable of the card (10% kept free)", m("usable")),
        # the "grads reduced" row below says when the fit needs the reduce per micro-batch
        ("  verdict", [c["verdict"].replace(" and grad sync per micro-batch", "")
                       .replace(" with grad sync per micro-batch", "")
                       .replace("checkpointing", "AC") for c in cols]),
        ("COMMUNICATION PER GPU PER STEP (GB sent)", [""] * len(cols)),
        ("  grads reduced (fsdp: parallel.grad_sync)", [_sync(c) for c in cols]),
        ("  dp reduce-scatter (grads)", [_gb(c["comm_bytes"]["dp"]["reduce_scatter"]) for c in cols]),
        ("  dp all-gather (params)", [_gb(c["comm_bytes"]["dp"]["all_gather"]) for c in cols]),
        ("  tp all-reduce (activations)", [_gb(c["comm_bytes"]["tp"]["all_reduce"]) for c in cols]),
        ("  dp time at NVLink / at network (s)", [f"{c['comm_seconds']['dp_at_nvlink']:.3f} / "
                                                 f"{c['comm_seconds']['dp_at_network']:.3f}" for c in cols]),
        ("  dp link used", [c["comm_seconds"]["dp_link"] for c in cols]),
        ("TIME PER STEP (s)", [""] * len(cols)),
        ("  compute", [f"{c['compute_s']:.3f}" for c in cols]),
        ("  exposed grad reduce / param gather", [f"{c['exposed_reduce_s']:.3f} / "
                                                 f"{c['exposed_gather_s']:.3f}" for c in cols]),
        ("  tp all-reduce (not hidden)", [f"{c['tp_s']:.3f}" for c in cols]),
        ("  optimizer step (HBM-bound)", [f"{c['optimizer_s']:.4f}" for c in cols]),
        ("  step", [f"{c['step_time_s']:.3f}" for c in cols]),
        ("  tokens/s per GPU", [f"{c['tokens_per_s_per_gpu']:,.0f}" for c in cols]),
        ("  model FLOPs utilisation", [f"{100 * c['model_mfu']:.1f}%" for c in cols]),
        (f"  time to train {plan['ranked'][0]['token_budget'] / 1e9 if plan['ranked'] else 0:,.0f}B tokens",
         [_dur(c["time_to_train_s"]) for c in cols]),
    ]


def _sync(c: dict) -> str:
    if c["strategy"] == "fsdp" and c["grad_sync"] == "micro_batch":
        return "each micro-batch"
    return "once per step"


def _name(c: dict) -> str:
    return f"{c['strategy']} dp{c['dp']} tp{c['tp']}"


def render(plan: dict) -> str:
    """The human-readable plan."""
    inp, mod, g = plan["inputs"], plan["model"], plan["gpu"]
    cols = list(plan["strategies"].values())
    head = [_name(c) for c in cols]
    lines = [
        f"plan: {mod['name']} ({mod['params'] / 1e9:.2f}B params, {mod['flops_per_token'] / 1e9:.1f} "
        f"GFLOP per token at seq {inp['seq']}) on {inp['gpus']} x {g['name']} "
        f"({inp['gpus_per_node']} per node)",
        f"batch: {inp['global_batch_tokens']:,} tokens per step = "
        f"{inp['global_batch_tokens'] // inp['seq']} sequences, micro-batch {inp['micro_batch']}; "
        f"precision {inp['precision']}, grads reduced in {inp['grad_reduce']}, optimizer state "
        f"{inp['state_dtype']}{', s kept (beta3 > 0)' if inp['beta3'] > 0 else ''}",
        f"assumed: MFU {100 * inp['mfu']:.0f}% of {g['bf16_flops'] / 1e12:.0f} TFLOP/s; NVLink "
        f"{g['nvlink_bps'] / 1e9:.0f} GB/s and network {g['network_bps'] / 1e9:.0f} GB/s per GPU per "
        f"direction at {100 * inp['link_efficiency']:.0f}% efficiency; HBM {g['hbm_bps'] / 1e12:.2f} TB/s",
        "",
    ]
    rows = _rows(plan)
    w = max([20] + [len(v) for _, vals in rows for v in vals] + [len(h) for h in head]) + 2
    lines.append(f"{'':46}" + "".join(f"{h:>{w}}" for h in head))
    for label, vals in rows:
        lines.append(f"{label:46}" + "".join(f"{v:>{w}}" for v in vals))
    lines += ["", "CONFIGS THAT FIT, fastest first:"]
    if not plan["ranked"]:
        lines.append("  none: more GPUs, a larger --tp, a smaller --micro-batch or a bigger card")
    for i, c in enumerate(plan["ranked"], 1):
        lines.append(f" {i}. {_name(c)}"
                     f"{' + activation checkpointing' if c['activation_checkpointing'] else ''}"
                     f"{' + grad sync per micro-batch' if c['grad_sync'] == 'micro_batch' else ''}: "
                     f"{c['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, {_gib(c['memory']['total'])} GiB, "
                     f"step {c['step_time_s']:.2f} s")
        lines.append(f"    {c['command']}")
        if c["note"]:
            lines.append(f"    note: {c['note']}")
    return "\n".join(lines)
