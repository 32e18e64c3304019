"""What runs a candidate: the ``sharded-ams train`` line (``[parallel]`` set for FSDP and
tensor parallelism, with either strategy), and what it cannot set, said plainly."""

from __future__ import annotations

from .model import ModelSpec

#: the config a named size's command starts from (its [model] table sets only arch and size)
BASE_CONFIG = "launcher/configs/llama_130m.toml"


def overrides(spec: ModelSpec, inp, cand: dict) -> list[str]:
    """``--set`` items that make the base config this candidate (tests load them with
    :func:`launcher.config.load_config`)."""
    sets = []
    named = not spec.name.endswith((".toml", ".yaml", ".yml"))
    if named:
        sets.append(f"model.size={spec.name}")
    sets += [f"model.vocab_size={spec.shape['vocab_size']}", f"model.block_size={inp.seq}",
             f"model.precision={inp.precision}",
             f"model.activation_checkpointing={str(cand['activation_checkpointing']).lower()}",
             f"data.block_size={inp.seq}",
             f"data.batch_size={inp.global_batch_tokens // inp.seq}",
             f"data.micro_batch_size={inp.micro_batch}",
             f"optim.grad_reduce_dtype={inp.grad_reduce}"]
    if inp.beta3 > 0:
        sets += ["optim.preset=", f"optim.beta3={inp.beta3}", "optim.lam=-1"]
    if cand["strategy"] == "fsdp":
        sets += ["parallel.strategy=fsdp", f"parallel.tp={cand['tp']}"]
        if cand.get("grad_sync", "step") != "step":
            sets.append(f"parallel.grad_sync={cand['grad_sync']}")
    elif cand["tp"] > 1:  # zero1 is the default strategy
        sets.append(f"parallel.tp={cand['tp']}")
    return sets


def run_line(spec: ModelSpec, inp, cand: dict) -> dict:
    """{"runnable", "command", "note"} for one candidate."""
    base = BASE_CONFIG if not spec.name.endswith((".toml", ".yaml", ".yml")) else \
        inp.extra.get("config_path", spec.name)
    sets = " ".join(f"--set {s}" for s in overrides(spec, inp, cand))
    command = (f"sharded-ams train {base} --address auto --num-workers {inp.gpus} --gpus "
               f"--storage-path /shared/runs {sets}")
    notes = []
    if inp.state_dtype == "bf16":
        notes.append("bf16 optimizer state is ShardedAMS(state_dtype=torch.bfloat16) in Python; "
                     "the launcher has no key for it yet")
    return {"runnable": not notes, "command": command, "note": "; ".join(notes)}
