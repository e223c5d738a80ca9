"""Benchmark (issue 3): one DPO training step, prefopt vs TRL + PEFT on PyTorch CPU.

One optimizer step = forward + backward + AdamW on a batch of real HH pairs (default 8, all
in one micro-batch), SmolLM2-135M-Instruct in float32, LoRA r=16, alpha=32, dropout 0 on
q, k, v, o, gate, up, down of every layer, DPO (sigmoid, beta 0.1), gradient clipping at
norm 1.0 (TRL's default). Reference log-probs are computed beforehand and not timed.

Each side runs in its own child process (started one after the other by this script) so
that each one's peak RSS is its own; both children get the same pairs (chosen by the parent
through prefopt's pipeline) and check that they score the same tokens:

  prefopt   prefopt.load(GGUF) -> core.lora_init -> reference = core.score(adapters off);
            timed: core.zero_grad(); core.train_step(tokens, segments, ref, dpo, 1/P);
            core.optimizer_step(lr, max_grad_norm=1.0)
  trl       trl.DPOTrainer(model=AutoModelForCausalLM(gguf_file=..., float32, default
            attention = sdpa), peft_config=LoraConfig(...), precompute_ref_log_probs=True,
            per_device_train_batch_size=P, max_length, use_cpu, bf16=False: float32 like
            prefopt; TRL's default is bf16=True, i.e. bf16 autocast, available as the
            side 'trl_bf16'); timed: each Trainer step
            (on_step_begin -> on_step_end callback: forward, backward, clipping, AdamW)

The first step of each side is a warm-up and not counted; the median of the next
``--repeats`` steps is reported. Peak RSS: ru_maxrss of the child (whole process, model
load included) and the peak during the timed steps alone (VmHWM reset through
/proc/self/clear_refs just before them).

Run:  python benchmarks/bench_train_step.py [--pairs 8] [--threads 2] [--repeats 3] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import common

TARGETS = list(common.LINEAR_NAMES)


# -- parent ------------------------------------------------------------------------------------

def choose_pairs(args) -> dict:
    """The first ``args.pairs`` HH pairs through prefopt's pipeline: messages and token ids."""
    from prefopt import tokenize
    tok = tokenize.tokenizer_from_gguf_file(args.gguf)
    kept, records, _ = common.load_token_pairs(tok, args.pairs, args.max_length, args.data)
    by_id = {r.id: r for r in records}
    pairs = []
    for p in kept:
        r = by_id[p.id]
        pairs.append({"id": p.id, "prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected,
                      "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                      "rejected_ids": p.rejected_ids})
    return {"pairs": pairs}


def run_child(side: str, args, pairs_file: str) -> dict:
    out = tempfile.NamedTemporaryFile(prefix=f"bench_{side}_", suffix=".json", delete=False)
    out.close()
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--pairs-file", pairs_file,
           "--child-out", out.name, "--gguf", args.gguf, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--max-length", str(args.max_length),
           "--rank", str(args.rank), "--alpha", str(args.alpha), "--beta", str(args.beta),
           "--lr", str(args.lr)]
    print(f"\n== {side} (child process; load average {common.load_average()})", flush=True)
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{side} child failed with exit code {r.returncode}")
    with open(out.name) as f:
        res = json.load(f)
    os.unlink(out.name)
    res["wall_s"] = time.perf_counter() - t0
    return res


def parent(args):
    info = common.machine_info()
    print(f"bench_train_step  {info['time_utc']}  cpu: {info.get('cpu')} x{info['cpus']}  "
          f"load average (1/5/15 min): {info['load_avg']}")
    args.gguf = common.gguf_path(args.gguf)
    chosen = choose_pairs(args)
    seg = np.array([(len(p["prompt_ids"]), len(p["chosen_ids"]), len(p["rejected_ids"]))
                    for p in chosen["pairs"]], dtype=np.int32)
    counts = common.token_counts(seg)
    print(f"data: {args.pairs} pairs of {args.data}, max_length {args.max_length}: prompt tokens "
          f"{counts['prompt_tokens']}, completion tokens {counts['completion_tokens']}, packed "
          f"(prefopt) {counts['packed_tokens']}, as separate sequences "
          f"{counts['sequence_tokens']}, longest sequence {counts['longest_sequence']} "
          f"(padded batch for TRL: {2 * args.pairs} x {counts['longest_sequence']} = "
          f"{2 * args.pairs * counts['longest_sequence']} tokens)")
    with tempfile.NamedTemporaryFile("w", prefix="bench_pairs_", suffix=".json",
                                     delete=False) as f:
        json.dump(chosen, f)
        pairs_file = f.name
    try:
        sides = {}
        for side in args.sides.split(","):
            sides[side] = run_child(side, args, pairs_file)
    finally:
        os.unlink(pairs_file)
    report(args, info, counts, sides)


def report(args, info, counts, sides):
    rows = []
    pf = sides.get("prefopt")
    for name, r in sides.items():
        t = r["median_step_s"]
        rows.append([name, t, min(r["step_times_s"]), t / args.pairs, r["peak_rss_mb"],
                     r["peak_rss_steps_mb"], r["model_gflop"], r["model_gflop"] / t,
                     100 * r["model_gflop"] / t / r["sgemm_peak"]["best_gflops"],
                     (t / pf["median_step_s"]) if pf else float("nan")])
    print("\n" + common.table(rows, ["side", "median s/step", "min s", "s/pair", "peak RSS MB",
                                     "peak RSS steps MB", "GFLOP", "GFLOP/s", "% peak",
                                     "time / prefopt"]))
    if pf:
        print(f"\nprefopt: sgemm peak {pf['sgemm_peak']['best_gflops']:.1f} GFLOP/s "
              f"(prefopt's OpenBLAS, {pf['sgemm_peak']['threads']} threads, 2048^3; model-shaped "
              f"{pf['sgemm_shaped']['best_gflops']:.1f}); achieved {pf['model_gflop'] / pf['median_step_s']:.1f} "
              f"GFLOP/s model FLOPs, {pf['executed_gflop'] / pf['median_step_s']:.1f} GFLOP/s counting "
              f"the per-layer recompute; forward alone (score with adapters) "
              f"{pf['median_forward_s']:.2f} s")
    for name in ("trl", "trl_bf16"):
        if name not in sides:
            continue
        tr = sides[name]
        print(f"{name}: torch.mm peak {tr['sgemm_peak']['best_gflops']:.1f} GFLOP/s "
              f"({tr['sgemm_peak']['threads']} threads, 2048^3)")
    trl_name = "trl" if "trl" in sides else "trl_bf16" if "trl_bf16" in sides else None
    if pf and trl_name:
        tr = sides[trl_name]
        ratio = tr["median_step_s"] / pf["median_step_s"]
        d_ref = np.abs(np.array(pf["ref_logp"]) - np.array(tr["ref_logp"]))
        rel = d_ref / np.maximum(np.abs(np.array(tr["ref_logp"])), 1e-12)
        print(f"equal work: token ids identical in both children: {tr['ids_match']}; reference "
              f"log-prob sums (prefopt vs TRL precompute) max rel diff {rel.max():.2e}; first-step "
              f"loss prefopt {pf['losses'][0]:.6f} vs TRL {tr['losses'][0]:.6f}")
        print(f"prefopt step is {ratio:.2f}x faster than TRL DPOTrainer + PEFT ({trl_name}) "
              f"({pf['median_step_s'] / args.pairs:.2f} vs {tr['median_step_s'] / args.pairs:.2f} "
              f"s per pair); peak RSS {pf['peak_rss_mb']:.0f} vs {tr['peak_rss_mb']:.0f} MB")
    else:
        ratio = float("nan")
    print("FLOPs ('GFLOP' column, per step, counted for the work each side does): forward = "
          "2*linear weights per token + LoRA 2*r*(in+out) per token + attention 4*hd*H*L per "
          "visible key + LM head 2*D*V per head position; backward = 2*linear weights per token "
          "(dX only, base frozen) + LoRA 4*r*(in+out) per token + attention 2x forward + head "
          "dX 2*D*V per head position. prefopt: packed tokens (prompt once per pair), "
          "prefix-shared attention, head at completion positions; the per-layer recompute in "
          "backward is left out of 'GFLOP' (model FLOPs) and reported separately. TRL: the "
          "padded [2P x longest] batch, full attention square (explicit mask), head at every "
          "position (TRL's fused head scores all positions on CPU).")
    record = {"benchmark": "train_step", "machine": info, "args": vars(args), "tokens": counts,
              "sides": sides, "step_time_ratio_trl_over_prefopt": ratio}
    common.append_json(args.json, record)


# -- children ----------------------------------------------------------------------------------

def child_prefopt(args, pairs):
    import prefopt
    from prefopt.objectives import objective_params

    prefopt.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pm = prefopt.load(args.gguf)
    core = pm.core
    t_load = time.perf_counter() - t0
    rss_loaded = common.rss_mb()
    pm.weights = None  # the core holds its own copy in its arena
    cfg = pm.config

    class P:  # PairIds-like
        def __init__(self, d):
            self.prompt_ids, self.chosen_ids, self.rejected_ids = (
                d["prompt_ids"], d["chosen_ids"], d["rejected_ids"])
    pids = [P(d) for d in pairs]
    toks, seg = common.packed(pids)
    # prefopt's own tokenizer on the same records must give the parent's ids
    tok = pm.tokenizer
    ids_ok = all(tok.encode_pair(d["prompt"], d["chosen"], d["rejected"],
                                 max_length=args.max_length)[0].chosen_full
                 == d["prompt_ids"] + d["chosen_ids"] for d in pairs)

    peak = common.sgemm_gflops(2048, 2048, 2048)
    shaped = common.sgemm_gflops(int(seg.sum()), cfg["hidden_size"], cfg["intermediate_size"])

    core.lora_init(args.rank, float(args.alpha), TARGETS, dropout=0.0, seed=0)
    ref = core.score(toks, seg, use_lora=False)["logp"]          # not timed
    obj = objective_params("dpo", beta=args.beta, label_smoothing=0.0)
    P_ = len(pids)

    def step(i):
        core.zero_grad()
        out = core.train_step(toks, seg, ref, obj, 1.0 / P_, i)
        gn = core.optimizer_step(args.lr, 0.9, 0.999, 1e-8, 0.0, 1.0)
        return float(np.mean(out["loss"])), gn

    losses, times = [], []
    loss0, _ = step(0)                                            # warm-up, not timed
    losses.append(loss0)
    reset_ok = common.reset_peak_rss()
    for i in range(args.repeats):
        t0 = time.perf_counter()
        loss, _ = step(i + 1)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        print(f"  prefopt step {i + 1}/{args.repeats}: {times[-1]:.2f} s  loss {loss:.6f}  "
              f"(load {common.load_average()[0]})", flush=True)
    rss_steps = common.rss_mb()["peak_rss_mb"] if reset_ok else float("nan")
    fwd = []
    for _ in range(max(1, args.repeats // 2)):
        t0 = time.perf_counter()
        core.score(toks, seg, use_lora=True)
        fwd.append(time.perf_counter() - t0)

    counts = common.token_counts(seg)
    keys = common.attention_keys_shared(seg)
    fw = common.forward_flops(cfg, counts["packed_tokens"], keys, counts["completion_tokens"],
                              args.rank, TARGETS)
    bw = common.backward_flops(cfg, counts["packed_tokens"], keys, counts["completion_tokens"],
                               args.rank, TARGETS)
    rec = common.layer_recompute_flops(cfg, counts["packed_tokens"], keys, args.rank, TARGETS)
    return {"side": "prefopt", "load_s": t_load, "step_times_s": times,
            "median_step_s": common.median(times), "median_forward_s": common.median(fwd),
            "losses": losses, "ref_logp": ref.tolist(), "ids_match": bool(ids_ok),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "rss_after_load_mb": rss_loaded["rss_mb"], "peak_rss_steps_mb": rss_steps,
            "sgemm_peak": peak, "sgemm_shaped": shaped,
            "model_gflop": (fw["total"] + bw["total"]) / 1e9,
            "executed_gflop": (fw["total"] + bw["total"] + rec) / 1e9,
            "flops_forward": fw, "flops_backward": bw, "flops_recompute": rec,
            "lora_params": common.lora_params(cfg, args.rank, TARGETS),
            "threads": prefopt.get_num_threads()}


def fix_smollm_pretokenizer(tok, gguf):
    """transformers' GGUF loader ignores ``tokenizer.ggml.pre = "smollm"`` (digits isolated
    before the GPT-2 regex, as SmolLM2's published tokenizer.json says) and tokenises e.g.
    "\\n\\n1." differently from the model's own tokenizer and from prefopt (see
    prefopt/tokenize.py and tests/test_tokenize.py). Give TRL the model's pre-tokenizer so that
    both sides train on the same token ids (checked afterwards)."""
    from gguf import GGUFReader
    from tokenizers import pre_tokenizers

    r = GGUFReader(gguf)
    f = r.fields.get("tokenizer.ggml.pre")
    pre = bytes(f.parts[f.data[0]]).decode() if f is not None else None
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return pre


def child_trl(args, pairs, bf16=False):
    import torch
    torch.set_num_threads(args.threads)
    import datasets
    import peft
    import transformers
    import trl

    datasets.disable_caching()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    gdir, gname = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    fix_smollm_pretokenizer(tok, args.gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname,
                                                              dtype=torch.float32)
    t_load = time.perf_counter() - t0
    # transformers marks a GGUF-loaded model as quantized (QuantizationMethod.GGUF) and the
    # Trainer refuses to train it, although its weights are dequantised float32 tensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    peak = common.torch_mm_gflops(2048, 2048, 2048)
    cfg = {"vocab_size": model.config.vocab_size, "hidden_size": model.config.hidden_size,
           "intermediate_size": model.config.intermediate_size,
           "num_hidden_layers": model.config.num_hidden_layers,
           "num_attention_heads": model.config.num_attention_heads,
           "num_key_value_heads": model.config.num_key_value_heads,
           "head_dim": getattr(model.config, "head_dim", None)
           or model.config.hidden_size // model.config.num_attention_heads}

    ds = datasets.Dataset.from_list([{"prompt": d["prompt"], "chosen": d["chosen"],
                                      "rejected": d["rejected"]} for d in pairs])
    P_ = len(pairs)
    out_dir = tempfile.mkdtemp(prefix="bench_trl_")
    conf = trl.DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=P_, gradient_accumulation_steps=1,
        max_steps=1 + args.repeats, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
        precompute_ref_log_probs=True, precompute_ref_batch_size=P_, report_to="none",
        save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0,
        disable_dropout=True, seed=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", bf16=bf16)  # TRL's own default is bf16=True (autocast)
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                           target_modules=TARGETS, task_type="CAUSAL_LM", bias="none")

    times, starts = [], {}
    state = {"reset_ok": False}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            if s.global_step == 1:  # after the warm-up step
                state["reset_ok"] = common.reset_peak_rss()
            starts["t"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            dt = time.perf_counter() - starts["t"]
            if s.global_step >= 2:
                times.append(dt)
                print(f"  trl step {len(times)}/{args.repeats}: {dt:.2f} s  "
                      f"(load {common.load_average()[0]})", flush=True)

    trainer = trl.DPOTrainer(model=model, args=conf, train_dataset=ds, processing_class=tok,
                             peft_config=lcfg, callbacks=[Timer()])
    trainer.train()
    rss_steps = common.rss_mb()["peak_rss_mb"] if state["reset_ok"] else float("nan")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tds = trainer.train_dataset
    ids_ok = all(list(tds[i]["prompt_ids"]) == d["prompt_ids"]
                 and list(tds[i]["chosen_ids"]) == d["chosen_ids"]
                 and list(tds[i]["rejected_ids"]) == d["rejected_ids"]
                 for i, d in enumerate(pairs))
    ref = [[float(tds[i]["ref_chosen_logps"]), float(tds[i]["ref_rejected_logps"])]
           for i in range(P_)] if "ref_chosen_logps" in tds.column_names else None

    lens = [len(d["prompt_ids"]) + len(d[c]) for d in pairs for c in ("chosen_ids", "rejected_ids")]
    lmax = max(lens)
    ntok = 2 * P_ * lmax
    keys = common.attention_keys_sequences(lens, padded_to=lmax)
    heads = 2 * P_ * (lmax - 1)
    fw = common.forward_flops(cfg, ntok, keys, heads, args.rank, TARGETS)
    bw = common.backward_flops(cfg, ntok, keys, heads, args.rank, TARGETS)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"side": "trl_bf16" if bf16 else "trl", "bf16_autocast": bool(bf16), "load_s": t_load, "step_times_s": times,
            "median_step_s": common.median(times), "losses": losses, "ref_logp": ref,
            "ids_match": bool(ids_ok),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "peak_rss_steps_mb": rss_steps, "sgemm_peak": peak,
            "model_gflop": (fw["total"] + bw["total"]) / 1e9, "flops_forward": fw,
            "flops_backward": bw, "trainable_params": n_trainable,
            "attn_implementation": model.config._attn_implementation,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "trl": trl.__version__, "peft": peft.__version__},
            "threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--data", default=common.DEFAULT_DATA)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--sides", default="prefopt,trl",
                    help="comma-separated: prefopt, trl (float32), trl_bf16 (TRL's default bf16 "
                         "autocast; not the same arithmetic)")
    ap.add_argument("--json", default=None, help="append results as one JSON line to this file")
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side is None:
        return parent(args)
    with open(args.pairs_file) as f:
        pairs = json.load(f)["pairs"]
    if args.side == "prefopt":
        res = child_prefopt(args, pairs)
    elif args.side in ("trl", "trl_bf16"):
        res = child_trl(args, pairs, bf16=args.side == "trl_bf16")
    else:
        raise SystemExit(f"unknown side {args.side!r} (prefopt, trl, trl_bf16)")
    with open(args.child_out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
