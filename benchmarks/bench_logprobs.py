"""Benchmark (issue 2): completion log-probs of real HH pairs, prefopt vs transformers eager.

Both sides run in this one process on the same token ids (prefopt's chat-template pipeline:
prefopt.data.load_pairs(hh_to_chat=True) -> prefopt.tokenize.encode_pairs) and the same
float32 weights (the SmolLM2-135M-Instruct Q4_1 GGUF, dequantised by each side), with the
same thread count. Repeats are interleaved (prefopt, transformers, transformers, prefopt...)
so machine noise hits every side alike; medians are reported.

Sides:
  prefopt                 _core.Model.score on packed micro-batches [prompt|chosen|rejected]
                          (prompt computed once per pair, LM head only at completion positions)
  transformers            AutoModelForCausalLM (attn_implementation="eager", float32), one
                          sequence (prompt+completion) per call, full logits (the default)
  transformers keep       the same with logits_to_keep = completion length + 1 (head only
                          where needed: the most favourable plain transformers call)

Run:  python benchmarks/bench_logprobs.py [--pairs 32] [--threads 2] [--repeats 3] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

import common


def prefopt_score(core, pair_ids, batch_size):
    logp = []
    for i in range(0, len(pair_ids), batch_size):
        toks, seg = common.packed(pair_ids[i:i + batch_size])
        logp.append(core.score(toks, seg, use_lora=False)["logp"])
    return np.concatenate(logp)


def hf_score(model, torch, pair_ids, keep: bool):
    out = np.empty((len(pair_ids), 2), dtype=np.float64)
    with torch.inference_mode():
        for i, p in enumerate(pair_ids):
            for j, comp in enumerate((p.chosen_ids, p.rejected_ids)):
                ids = torch.tensor([p.prompt_ids + comp], dtype=torch.long)
                lc = len(comp)
                if keep:
                    logits = model(input_ids=ids, logits_to_keep=lc + 1).logits[0, :-1]
                else:
                    logits = model(input_ids=ids).logits[0, len(p.prompt_ids) - 1:-1]
                lsm = torch.log_softmax(logits.float(), dim=-1)
                tgt = torch.tensor(comp, dtype=torch.long)
                out[i, j] = lsm.gather(1, tgt[:, None]).double().sum().item()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the SmolLM2 dev copy or "
                    "prefopt.models.fetch_path())")
    ap.add_argument("--data", default=common.DEFAULT_DATA)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="prefopt pairs per score() call")
    ap.add_argument("--no-keep", action="store_true", help="skip the logits_to_keep variant")
    ap.add_argument("--json", default=None, help="append results as one JSON line to this file")
    args = ap.parse_args(argv)

    info = common.machine_info()
    print(f"bench_logprobs  {info['time_utc']}  cpu: {info.get('cpu')} x{info['cpus']}  "
          f"load average (1/5/15 min): {info['load_avg']}")
    import prefopt
    prefopt.set_num_threads(args.threads)
    gguf = common.gguf_path(args.gguf)
    t0 = time.perf_counter()
    pm = prefopt.load(gguf)
    core = pm.core
    t_load_pf = time.perf_counter() - t0
    pm.weights = None  # the core keeps its own copy
    cfg = pm.config
    pair_ids, _, _ = common.load_token_pairs(pm.tokenizer, args.pairs, args.max_length, args.data)
    toks, seg = common.packed(pair_ids)
    counts = common.token_counts(seg)
    print(f"model: {gguf}\n  {pm!r}\n  prefopt load {t_load_pf:.1f} s; threads: prefopt "
          f"{prefopt.get_num_threads()}")
    print(f"data: {args.pairs} pairs of {args.data}, max_length {args.max_length}: "
          f"prompt tokens {counts['prompt_tokens']}, completion tokens "
          f"{counts['completion_tokens']}, packed (prefopt) {counts['packed_tokens']}, "
          f"as separate sequences {counts['sequence_tokens']}, longest sequence "
          f"{counts['longest_sequence']}")

    import torch
    import transformers
    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)), gguf_file=os.path.basename(gguf),
        attn_implementation="eager", dtype=torch.float32)
    hf.eval()
    t_load_hf = time.perf_counter() - t0
    print(f"  transformers {transformers.__version__} / torch {torch.__version__} load "
          f"{t_load_hf:.1f} s; threads: torch {torch.get_num_threads()}")

    # sgemm peaks, same process, same thread counts
    n = 2048
    peak = common.sgemm_gflops(n, n, n)
    mb_tokens = int(seg[:args.batch_size].sum())
    shaped = common.sgemm_gflops(mb_tokens, cfg["hidden_size"], cfg["intermediate_size"])
    tpeak = common.torch_mm_gflops(n, n, n)
    print(f"sgemm peak (prefopt's OpenBLAS via scipy_cblas_sgemm, {peak['threads']} threads): "
          f"{n}^3 best {peak['best_gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f}); "
          f"model-shaped {mb_tokens}x{cfg['hidden_size']}x{cfg['intermediate_size']} best "
          f"{shaped['best_gflops']:.1f}")
    print(f"torch.mm {n}^3 ({tpeak['threads']} threads): best {tpeak['best_gflops']:.1f} GFLOP/s "
          f"(median {tpeak['median_gflops']:.1f})")

    sides = {"prefopt": lambda ps: prefopt_score(core, ps, args.batch_size),
             "transformers eager": lambda ps: hf_score(hf, torch, ps, keep=False)}
    if not args.no_keep:
        sides["transformers eager keep"] = lambda ps: hf_score(hf, torch, ps, keep=True)
    for k in sides:  # warm-up on one pair (first-call allocations, thread start)
        sides[k](pair_ids[:1])
    times = {k: [] for k in sides}
    logps = {}
    loads = []
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for k in order:
            t0 = time.perf_counter()
            logps[k] = sides[k](pair_ids)
            times[k].append(time.perf_counter() - t0)
        loads.append(common.load_average()[0])
        print(f"  repeat {r + 1}/{args.repeats}: " +
              ", ".join(f"{k} {times[k][-1]:.2f} s" for k in sides) + f"  (load {loads[-1]})",
              flush=True)

    # equal work: the same log-prob sums on every side
    lp_pf, lp_hf = logps["prefopt"], logps["transformers eager"]
    rel = np.abs(lp_pf - lp_hf) / np.maximum(np.abs(lp_hf), 1e-12)
    print(f"equal work: {lp_pf.size} completion log-prob sums, max |prefopt - transformers| / "
          f"|transformers| = {rel.max():.2e} (max abs {np.abs(lp_pf - lp_hf).max():.2e})")
    if not args.no_keep:
        print(f"  logits_to_keep variant vs full logits: max abs diff "
              f"{np.abs(logps['transformers eager keep'] - lp_hf).max():.2e}")

    # FLOPs
    lens = [len(p.prompt_ids) + len(c) for p in pair_ids for c in (p.chosen_ids, p.rejected_ids)]
    flops = {
        "prefopt": common.forward_flops(cfg, counts["packed_tokens"],
                                        common.attention_keys_shared(seg),
                                        counts["completion_tokens"]),
        "transformers eager": common.forward_flops(cfg, counts["sequence_tokens"],
                                                   common.attention_keys_sequences(lens),
                                                   counts["sequence_tokens"]),
        "transformers eager keep": common.forward_flops(
            cfg, counts["sequence_tokens"], common.attention_keys_sequences(lens),
            counts["completion_tokens"] + 2 * len(pair_ids)),
    }
    rows, results = [], {}
    t_ref = common.median(times["prefopt"])
    for k in sides:
        t = common.median(times[k])
        f = flops[k]["total"]
        res = {"median_s": t, "min_s": min(times[k]), "times_s": times[k],
               "sequence_tokens_per_s": counts["sequence_tokens"] / t,
               "completion_tokens_per_s": counts["completion_tokens"] / t,
               "gflop": f / 1e9, "gflops": f / t / 1e9,
               "pct_sgemm_peak": 100 * f / t / 1e9 / peak["best_gflops"],
               "time_vs_prefopt": t / t_ref, "flops_by_part": flops[k]}
        results[k] = res
        rows.append([k, t, min(times[k]), res["sequence_tokens_per_s"],
                     res["completion_tokens_per_s"], res["gflop"], res["gflops"],
                     res["pct_sgemm_peak"], res["time_vs_prefopt"]])
    print()
    print(common.table(rows, ["side", "median s", "min s", "seq tok/s", "compl tok/s",
                              "GFLOP", "GFLOP/s", "% peak", "time / prefopt"]))
    speed = results["transformers eager"]["median_s"] / t_ref
    print(f"\nprefopt is {speed:.2f}x faster than transformers eager (full logits) in tokens/s"
          + (f", {results['transformers eager keep']['median_s'] / t_ref:.2f}x faster than "
             f"transformers eager with logits_to_keep" if not args.no_keep else ""))
    print(f"prefopt achieves {results['prefopt']['gflops']:.1f} GFLOP/s = "
          f"{results['prefopt']['pct_sgemm_peak']:.0f}% of the {peak['best_gflops']:.1f} GFLOP/s "
          f"sgemm peak ({shaped['best_gflops']:.1f} for a model-shaped sgemm)")
    print("tokens/s: 'seq tok/s' = sum over pairs of len(prompt+chosen)+len(prompt+rejected) per "
          "second (same numerator for every side, so it is the inverse time ratio); 'compl tok/s' "
          "= scored completion tokens per second.\nFLOPs counted per side for the work it "
          "actually does: 2*linear weights per token through the decoder (prefopt: packed "
          "tokens, prompt once per pair; transformers: every sequence token), attention QK^T+PV "
          "4*hd*H*L per visible key (prefopt: prefix-shared causal structure; transformers: "
          "causal per sequence), LM head 2*D*V per position with logits (prefopt: completion "
          "positions; transformers: every position, or completion+1 with logits_to_keep); "
          "norms, RoPE, softmax and SwiGLU not counted.")
    record = {"benchmark": "logprobs", "machine": info, "args": vars(args), "gguf": gguf,
              "config": cfg, "tokens": counts, "sgemm_peak": peak, "sgemm_model_shaped": shaped,
              "torch_mm_peak": tpeak, "max_rel_diff_logp": float(rel.max()),
              "load_avg_per_repeat": loads, "results": results,
              "speedup_vs_transformers_eager": speed}
    common.append_json(args.json, record)
    return record


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
