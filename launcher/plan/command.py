"""``sharded-ams plan``: the argparse front. Bad input is one line on stderr and exit
status 2, as argparse's own errors."""

from __future__ import annotations

import argparse
import json
import sys

from .report import DEFAULT_MFU, STRATEGIES


def _positive(text: str) -> int:
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_plan_subparser(subparsers) -> None:
    from .hardware import GPUS

    p = subparsers.add_parser(
        "plan", help="memory, communication and step time of a run before renting the cluster",
        description="Plan a pre-training run on paper: memory per GPU by item, bytes sent per "
                    "step and their time, step time and tokens/s, for ZeRO-1 and FSDP, and the "
                    "configs that fit, ranked, with the command that runs them. docs/plan.md "
                    "says where every number comes from.")
    p.add_argument("model_arg", nargs="?", metavar="MODEL",
                   help="the same as --model (as `sharded-ams train CONFIG` takes its config)")
    p.add_argument("--model", help="a Llama size (tiny, 60m, 130m, 350m, 1b, llama3-8b, "
                                   "llama3-70b) or a job config file (.toml)")
    p.add_argument("--gpus", type=_positive, help="GPUs in the job")
    p.add_argument("--gpus-per-node", type=_positive, default=8)
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--seq", type=_positive,
                   help="sequence length (default: a config's data.block_size, else 8192)")
    p.add_argument("--global-batch-tokens", type=_positive,
                   help="tokens per optimizer step (default: a config's data.batch_size "
                        "sequences of --seq tokens, else 4Mi, 512 x 8192)")
    p.add_argument("--micro-batch", type=_positive,
                   help="sequences per micro-batch per GPU (default: a config's "
                        "data.micro_batch_size, else 1)")
    p.add_argument("--strategy", choices=STRATEGIES, help="default: compare both")
    p.add_argument("--tp", type=_positive, help="tensor-parallel size (default: try 1, 2, 4, 8)")
    p.add_argument("--precision", choices=("bf16", "fp32", "bf16-autocast"),
                   help="default: a config's model.precision (auto: bf16), else bf16")
    p.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"),
                   help="default: a config's optim.grad_reduce_dtype, else fp32")
    p.add_argument("--state-dtype", default="fp32", choices=("fp32", "bf16"),
                   help="storage of m, v[, s] (ShardedAMS state_dtype)")
    p.add_argument("--beta3", type=float,
                   help="> 0 keeps the third state s (default: a config's optimizer's, else 0)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help="plan with (or --no-...: without) checkpointing only "
                                      "(default: both, checkpointing where it is needed)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help=f"model FLOPs utilisation without checkpointing, i.e. the fraction of "
                        f"the bf16 peak the GPU runs at (default {DEFAULT_MFU}); checkpointing "
                        f"adds a forward at that rate")
    p.add_argument("--link-efficiency", type=float, default=0.8,
                   help="achieved fraction of the link bandwidths (default 0.8)")
    p.add_argument("--tokens", type=float, help="token budget (default 20 per parameter)")
    p.add_argument("--vocab", type=_positive, help="vocabulary (default: the size's, else 32000)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--layout-report", action="store_true",
                   help="instead: the project's own ZeRO-1 layout, checkpoint manifest and "
                        "reshard plan for --model at --gpus ranks (and 3/4 of them)")
    p.set_defaults(func=cmd_plan)


def _error(msg: str) -> int:
    print(f"sharded-ams plan: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


#: the run's own flags: what a job config file gives when the flag is not, else this
RUN_DEFAULTS = {"seq": 8192, "global_batch_tokens": 4 * 1024 * 1024, "micro_batch": 1,
                "precision": "bf16", "grad_reduce_dtype": "fp32", "beta3": 0.0}


def config_run(path: str) -> dict:
    """The run a job config file describes, as plan flags: sequence length, global batch
    in sequences, micro-batch, precision, gradient reduction dtype and beta3 (a preset's).
    What the plan explores (strategy, tp, checkpointing) is left to it. Keys the config
    leaves unset (a micro-batch of batch / workers) are absent."""
    from launcher.config import load_config
    from sharded_ams.config import DEFAULTS, preset_hparams

    from .model import config_file

    cfg = load_config(config_file(path))
    seq = cfg.data.block_size or cfg.model.shape().get("block_size")
    out = {"seq": seq, "batch_sequences": cfg.data.batch_size,
           "micro_batch": cfg.data.micro_batch_size,
           "precision": "bf16" if cfg.model.precision == "auto" else cfg.model.precision,
           "grad_reduce_dtype": cfg.optim.grad_reduce_dtype,
           "beta3": preset_hparams(cfg.optim.preset)["beta3"] if cfg.optim.preset else
           (DEFAULTS["beta3"] if cfg.optim.beta3 is None else cfg.optim.beta3)}
    return {k: v for k, v in out.items() if v is not None}


def _fill_run(args: argparse.Namespace, from_config: dict) -> dict:
    """Each run flag not given: the config's value, else the built-in default. Returns the
    values taken from the config."""
    taken = {}
    if args.global_batch_tokens is None and "batch_sequences" in from_config:
        seq = args.seq or from_config.get("seq") or RUN_DEFAULTS["seq"]
        args.global_batch_tokens = from_config["batch_sequences"] * seq
        taken["batch_sequences"] = from_config["batch_sequences"]
    for key, default in RUN_DEFAULTS.items():
        if getattr(args, key) is None:
            taken_here = key in from_config
            setattr(args, key, from_config[key] if taken_here else default)
            if taken_here:
                taken[key] = from_config[key]
    return taken


def _inputs(args: argparse.Namespace):
    from .report import PlanInputs

    if not 0 < args.mfu <= 1 or not 0 < args.link_efficiency <= 1:
        raise ValueError("--mfu and --link-efficiency must be in (0, 1]")
    if not 0 <= args.beta3 < 1:
        raise ValueError(f"--beta3 must be in [0, 1), got {args.beta3}")
    return PlanInputs(
        gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu=args.gpu, seq=args.seq,
        global_batch_tokens=args.global_batch_tokens, micro_batch=args.micro_batch,
        strategies=(args.strategy,) if args.strategy else STRATEGIES, tp=args.tp,
        precision=args.precision, grad_reduce=args.grad_reduce_dtype, state_dtype=args.state_dtype,
        beta3=args.beta3, checkpointing=args.activation_checkpointing, mfu=args.mfu,
        link_efficiency=args.link_efficiency, token_budget=args.tokens,
        extra={"config_path": args.model})


def cmd_plan(args: argparse.Namespace) -> int:
    if args.model_arg is not None:
        if args.model is not None and args.model != args.model_arg:
            return _error(f"two models given: {args.model_arg!r} and --model {args.model!r}")
        args.model = args.model_arg
    if not args.model or not args.gpus:
        return _error("a model (MODEL or --model: a Llama size or a job config file) and "
                      "--gpus are required")
    try:
        from .model import is_config, load_model

        from_config = _fill_run(args, config_run(args.model) if is_config(args.model) else {})
        if args.layout_report:
            from .machinery import layout_report, render_layout_report

            spec = load_model(args.model, args.seq, args.vocab)
            rep = layout_report(spec, args.gpus)
            print(json.dumps(rep, indent=1) if args.json else render_layout_report(rep))
            return 0
        inp = _inputs(args)
        spec = load_model(args.model, args.seq, args.vocab)
        from .report import build_plan

        plan = build_plan(spec, inp)
    except ValueError as exc:
        return _error(exc)
    plan["from_config"] = from_config
    if args.json:
        print(json.dumps(plan, indent=1, default=str))
    else:
        from .render import render

        if from_config:
            order = ["seq", "batch_sequences", *RUN_DEFAULTS]
            print(f"from {args.model} (flags override): " + ", ".join(
                f"{k.replace('_', '-')} {from_config[k]}" for k in dict.fromkeys(order)
                if k in from_config))
        print(render(plan))
    return 0
