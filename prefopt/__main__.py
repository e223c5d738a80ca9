"""Command line: ``python -m prefopt ablate`` (the main job), ``--version``, ``show-config``.

    python -m prefopt ablate                      # SmolLM2-135M-Instruct x shipped sales pairs,
                                                  # DPO vs SimPO at LoRA rank 16 and 8
    python -m prefopt ablate --data my.jsonl --heldout 40 --objectives dpo,simpo,orpo \\
        --ranks 32,16,8 --steps 60 --lr 2e-4 --out runs/
    python -m prefopt show-config                 # BLAS build, threads

Every fixed hyperparameter has a flag (``python -m prefopt ablate --help``); objective
parameters are per objective (``--dpo-beta``, ``--simpo-beta``, ``--simpo-gamma`` or
``--gamma-beta-ratio``, ``--orpo-lambda``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Defaults of the main job (see DEFAULTS.md section in README): chosen so the 2x2 matrix on the
# shipped sales set shows real learning and finishes in under 15 minutes on 2 CPU cores.
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_OBJECTIVES = "dpo,simpo"
DEFAULT_RANKS = "16,8"
DEFAULTS = dict(
    max_steps=16,            # 64 of the 88 training pairs at 4 pairs per step (~0.7 epoch)
    learning_rate=2e-4,
    lr_schedule="linear",
    warmup_steps=0,          # (transformers' warmup makes the first step's LR 0)
    pairs_per_step=4,
    micro_batch_size=4,
    max_length=384,          # the sales pairs fit whole (longest prompt 101, completion 118)
    max_prompt_length=256,
    seed=42,
    eval_every=8,            # held-out at steps 0 (free: policy == reference), 8 and 16
    logging_steps=1,
    lora_targets="all-linear",
    max_grad_norm=1.0,
    weight_decay=0.0,
)
DEFAULT_DPO_BETA = 0.1
DEFAULT_SIMPO_BETA = 2.0
DEFAULT_GAMMA_BETA_RATIO = 0.5
DEFAULT_ORPO_LAMBDA = 0.1


def shipped_data_path() -> Path:
    """The preference set shipped with prefopt (sales conversations with slice and split)."""
    return Path(__file__).resolve().parent / "data" / "sales_pairs.jsonl"


def _csv(s, conv=str):
    items = [x.strip() for x in str(s).split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
    try:
        return [conv(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad list {s!r}") from None


def _heldout(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--heldout takes a count or a fraction, got {s!r}") from None
    return int(v) if v >= 1 and v == int(v) else v


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="python -m prefopt",
                                description="LoRA preference tuning (DPO / SimPO / ORPO) with a C "
                                            "core; the objective x rank ablation.")
    p.add_argument("--version", action="version", version=f"prefopt {__version__}")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("show-config", help="print the BLAS build and threads")
    a = sub.add_parser("ablate", help="run the objective x LoRA-rank ablation and print the verdict",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = a.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="known model name, GGUF file or Hugging Face model directory")
    g.add_argument("--data", default=None,
                   help="preference pairs (.jsonl/.json[.gz], TRL shapes); default: the shipped "
                        "sales set (its split field gives 88 train / 22 held-out)")
    g.add_argument("--hh-to-chat", action="store_true",
                   help="turn Anthropic-HH text pairs into chat messages (for instruct models)")
    g.add_argument("--limit", type=int, default=None, help="use only the first N valid pairs")
    g.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed records (counted and listed) instead of stopping")
    g.add_argument("--heldout", type=_heldout, default=None,
                   help="held-out count or fraction (seeded split, ignores a split field); "
                        "default: the data's split field, else 20%%")
    g.add_argument("--heldout-ids", type=_csv, default=None, help="comma-separated held-out pair ids")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/held-out split")
    g = a.add_argument_group("the matrix")
    g.add_argument("--objectives", type=_csv, default=_csv(DEFAULT_OBJECTIVES),
                   help="objectives to compare (dpo, simpo, orpo)")
    g.add_argument("--ranks", type=lambda s: _csv(s, int), default=_csv(DEFAULT_RANKS, int),
                   help="LoRA ranks")
    g = a.add_argument_group("objective parameters (per objective)")
    g.add_argument("--dpo-beta", type=float, default=DEFAULT_DPO_BETA, help="DPO beta")
    g.add_argument("--dpo-loss", choices=["sigmoid", "ipo", "hinge"], default="sigmoid",
                   help="DPO loss variant")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cDPO epsilon (DPO sigmoid)")
    g.add_argument("--simpo-beta", type=float, default=DEFAULT_SIMPO_BETA, help="SimPO beta")
    gg = g.add_mutually_exclusive_group()
    gg.add_argument("--simpo-gamma", type=float, default=None,
                    help="SimPO absolute margin gamma (TRL's simpo_gamma)")
    gg.add_argument("--gamma-beta-ratio", type=float, default=None,
                    help=f"SimPO gamma/beta (SimPO repo); default {DEFAULT_GAMMA_BETA_RATIO} "
                         f"when --simpo-gamma is not given")
    g.add_argument("--sft-weight", type=float, default=0.0, help="SimPO SFT term weight")
    g.add_argument("--orpo-lambda", type=float, default=DEFAULT_ORPO_LAMBDA,
                   help="ORPO odds-ratio weight (TRL's ORPO beta)")
    g = a.add_argument_group("fixed settings (identical in every run)")
    d = DEFAULTS
    g.add_argument("--steps", type=int, default=d["max_steps"], help="optimizer steps per run")
    g.add_argument("--epochs", type=float, default=None, help="epochs per run (instead of --steps)")
    g.add_argument("--lr", type=float, default=d["learning_rate"], help="learning rate")
    g.add_argument("--schedule", choices=["linear", "cosine", "constant"], default=d["lr_schedule"])
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    g.add_argument("--warmup-ratio", type=float, default=0.0)
    g.add_argument("--pairs-per-step", type=int, default=d["pairs_per_step"], help="effective batch")
    g.add_argument("--micro-batch", type=int, default=d["micro_batch_size"],
                   help="pairs per core call (gradient accumulation)")
    g.add_argument("--max-length", type=int, default=d["max_length"])
    g.add_argument("--max-prompt-length", type=int, default=d["max_prompt_length"])
    g.add_argument("--seed", type=int, default=d["seed"])
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="held-out evaluation every N steps (and at the end)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    g.add_argument("--logging-steps", type=int, default=d["logging_steps"])
    g.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"])
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA alpha (default 2 x rank, keeping alpha/rank fixed)")
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default=d["lora_targets"],
                   help="all-linear or comma-separated q,k,v,o,gate,up,down")
    g.add_argument("--rslora", action="store_true", help="rsLoRA scaling alpha/sqrt(rank)")
    g.add_argument("--keep-dropout", action="store_true",
                   help="train with --lora-dropout (TRL disables all dropout by default, so do we)")
    g = a.add_argument_group("decision and output")
    g.add_argument("--metric", choices=["avg", "ref"], default="avg",
                   help="held-out correctness used by the decision rule")
    g.add_argument("--important-slices", type=_csv, default=None,
                   help="slices that must not regress (default: all)")
    g.add_argument("--out", default="prefopt-ablation", help="output directory")
    g.add_argument("--threads", type=int, default=None, help="BLAS threads (default: all cores)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--fresh", action="store_true",
                   help="do not reuse finished runs / checkpoints found in --out")
    return p


def configs_from_args(args):
    """(base TrainConfig, objective_params) from parsed ablate arguments."""
    from .train import TrainConfig

    targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(_csv(args.lora_targets))
    base = TrainConfig(
        max_steps=None if args.epochs is not None else args.steps, epochs=args.epochs,
        learning_rate=args.lr, lr_schedule=args.schedule, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio, pairs_per_step=args.pairs_per_step,
        micro_batch_size=args.micro_batch, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length if args.max_prompt_length > 0 else None,
        seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
        logging_steps=args.logging_steps, max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=targets, use_rslora=args.rslora,
        disable_dropout=not args.keep_dropout)
    simpo = {"beta": args.simpo_beta, "sft_weight": args.sft_weight}
    if args.simpo_gamma is not None:
        simpo["gamma"] = args.simpo_gamma
    else:
        simpo["gamma_beta_ratio"] = (args.gamma_beta_ratio if args.gamma_beta_ratio is not None
                                     else DEFAULT_GAMMA_BETA_RATIO)
    params = {"dpo": {"beta": args.dpo_beta, "loss_type": args.dpo_loss,
                      "label_smoothing": args.label_smoothing},
              "simpo": simpo, "orpo": {"orpo_lambda": args.orpo_lambda}}
    objectives = [o.lower() for o in args.objectives]
    for o in objectives:
        if o not in params:
            raise SystemExit(f"unknown objective {o!r}; choose among dpo, simpo, orpo")
    return base, {o: params[o] for o in objectives}


def cmd_ablate(args) -> int:
    import prefopt
    from . import data as pdata
    from .experiment import ablate

    threads = args.threads or os.cpu_count() or 1
    prefopt.set_num_threads(threads)
    base, obj_params = configs_from_args(args)
    data_path = Path(args.data) if args.data else shipped_data_path()
    if not data_path.exists():
        raise SystemExit(f"data file not found: {data_path}")
    t0 = time.time()
    pairs = pdata.load_pairs(data_path, hh_to_chat=args.hh_to_chat, limit=args.limit,
                             skip_invalid=args.skip_invalid)
    if pairs.skipped:
        print(f"prefopt: skipped {len(pairs.skipped)} malformed records, e.g. "
              f"{pairs.skipped[0][1]}", flush=True)
    print(f"prefopt: {len(pairs)} pairs from {data_path}; model {args.model}; "
          f"{threads} thread(s)", flush=True)
    from . import models

    model = models.load(args.model)
    print(f"prefopt: loaded {model!r} in {time.time() - t0:.1f}s", flush=True)
    res = ablate(model, pairs, objectives=[o.lower() for o in args.objectives], ranks=args.ranks,
                 base_config=base, out_dir=args.out, objective_params=obj_params,
                 heldout=args.heldout, heldout_ids=args.heldout_ids, split_seed=args.split_seed,
                 metric=args.metric, important_slices=args.important_slices,
                 progress=not args.no_progress, resume=not args.fresh, plots=not args.no_plots,
                 data_label=data_path.name, fresh=args.fresh)
    print()
    table = res.table
    try:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    except AttributeError:
        for row in table:
            print(row)
    print()
    print(res.verdict.text)
    print()
    print(f"report: {res.report_path}")
    print(f"total wall time: {time.time() - t0:.0f}s")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "show-config":
        import prefopt

        prefopt.show_config()
        return 0
    if args.command == "ablate":
        return cmd_ablate(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
