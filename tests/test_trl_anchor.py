"""Anchor: prefopt's C trainer against TRL on a tiny random Llama model.

Five optimizer steps of DPOTrainer, CPOTrainer(loss_type="simpo", cpo_alpha=0) (= SimPO)
and ORPOTrainer with identical pairs, order, LoRA configuration and initial A (prefopt's
initial A is copied into the PEFT model; B = 0 in both), learning rate and schedule,
AdamW, clipping at 1.0 and dropout 0. Per step, TRL's logged ``loss``, ``grad_norm`` and
``rewards/*`` (plus ``logps/*`` and the ORPO extras) must equal prefopt's within 1e-4,
and the final adapters must agree.

Where TRL's conventions differ from prefopt's (design.md), the mapping used here:

* Tokens. TRL tokenises the text itself (DPO: prompt with BOS, completion + EOS text;
  CPO/ORPO: ``build_tokenized_answer`` + BOS/EOS). The test reads the token ids back from
  ``trainer.train_dataset`` and feeds exactly those to prefopt, so tokenisation is out of
  the comparison (it is tested elsewhere). A word-level tokenizer makes the ids obvious.
* Order. HF's Trainer shuffles with a RandomSampler; the test swaps in a SequentialSampler
  so that step k uses pairs [k*B, (k+1)*B) in both.
* ORPO NLL scope. TRL's ORPO NLL is a token mean over prompt AND completion tokens of the
  whole micro-batch's chosen sequences; prefopt's is -Lc/nc per pair (completion tokens
  only), averaged over pairs. They coincide when every micro-batch has one pair and the
  prompt is only BOS (BOS is never predicted, so "prompt + completion" tokens are the
  completion tokens). The ORPO run therefore uses micro-batch 1 with gradient accumulation
  2 (TRL divides each micro-batch loss by 2 -- equal pair weights, as prefopt) and
  BOS-only prompts. Prefix sharing of longer prompts is exercised by the DPO and SimPO runs.
* SimPO in TRL is CPOTrainer(loss_type="simpo", cpo_alpha=0); ``simpo_gamma`` is the
  absolute margin gamma (prefopt's ``gamma``), not the SimPO repo's gamma_beta_ratio.
  TRL's ``logps/*`` for SimPO and ORPO are per-token means (sum / n); DPO's are sums.
* ORPO's ``beta`` in TRL is prefopt's ``lambda``; rewards are lambda * mean log-prob.
* ``learning_rate``: transformers 4.x read it after the scheduler had stepped (the rate
  of the NEXT update); transformers 5.x (5.24 here) logs the rate the logged update used,
  which is what prefopt's lr_at(step) gives. The test checks the 5.x convention.
* The reference for DPO is the base model (PEFT adapter disabled), as prefopt's
  ``score(use_lora=False)``.
"""
import os
import sys

import numpy as np
import pytest
import torch

import prefopt
from prefopt import _core
from prefopt.lora import from_peft_name

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as tm  # noqa: E402

torch.set_num_threads(1)
prefopt.set_num_threads(1)

trl = pytest.importorskip("trl")  # listed in the test extras; absent trl is a setup error in CI

V = tm.TINY["vocab_size"]
STEPS = 5
SEED = 0
RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4


def word_tokenizer():
    """Word-level tokenizer: "<pad>"=0, "<s>"=1 (BOS, added in front), "</s>"=2, "w{i}"=i."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def text_pairs(n, seed, bos_only_prompt=False):
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(f"w{int(i)}" for i in rng.integers(3, V, k))
    rows = []
    for _ in range(n):
        prompt = "" if bos_only_prompt else words(int(rng.integers(1, 6)))
        chosen, rejected = words(int(rng.integers(1, 6))), words(int(rng.integers(1, 6)))
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def sequential(cls):
    class Sequential(cls):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    Sequential.__name__ = "Sequential" + cls.__name__
    return Sequential


def token_pairs(trainer, kind):
    """(prompt, chosen, rejected) id lists exactly as TRL will train on them."""
    out = []
    for ex in trainer.train_dataset:
        if kind == "dpo":
            out.append((list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"])))
        else:
            n = len(ex["prompt_input_ids"])
            c, r = list(ex["chosen_input_ids"]), list(ex["rejected_input_ids"])
            assert c[:n] == r[:n] == list(ex["prompt_input_ids"])
            assert ex["chosen_labels"][:n] == [-100] * n and ex["chosen_labels"][n:] == c[n:]
            out.append((c[:n], c[n:], r[n:]))
    return out


def run_trl(kind, rows, lr, sched, per_device, accum, hp):
    from datasets import Dataset
    from peft import LoraConfig

    common = dict(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), f"prefopt_anchor_{kind}"),
                  per_device_train_batch_size=per_device, gradient_accumulation_steps=accum,
                  max_steps=STEPS, learning_rate=lr, lr_scheduler_type=sched, warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, bf16=False, use_cpu=True,
                  gradient_checkpointing=False, report_to=[], save_strategy="no", seed=SEED,
                  dataloader_num_workers=0, disable_tqdm=True)
    peft_cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        args, cls = DPOConfig(beta=hp["beta"], loss_type="sigmoid", **common), DPOTrainer
    elif kind == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=hp["beta"], simpo_gamma=hp["gamma"], **common)
        cls = CPOTrainer
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args, cls = ORPOConfig(beta=hp["lambda"], **common), ORPOTrainer
    model = tm.make_model("llama", seed=SEED)
    trainer = sequential(cls)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=word_tokenizer(), peft_config=peft_cfg)
    return trainer


def copy_initial_lora(trainer, state):
    n = 0
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                core = from_peft_name(name if name.startswith("base_model.model.") else
                                      "base_model.model." + name.split("base_model.model.", 1)[-1])
                src = torch.from_numpy(state[core])
                assert p.shape == src.shape, (name, p.shape, src.shape)
                if ".lora_B." in name:
                    assert torch.all(p == 0) and torch.all(src == 0)
                p.copy_(src)
                n += 1
    assert n == len(state)


def peft_state(trainer):
    out = {}
    for name, p in trainer.model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[from_peft_name("base_model.model." + name.split("base_model.model.", 1)[-1])] = \
                p.detach().numpy().copy()
    return out


def run_prefopt(pairs, objective, lr, sched, per_step, micro):
    m = tm.to_prefopt(tm.make_model("llama", seed=SEED))
    m.lora_init(RANK, ALPHA, TARGETS, use_rslora=False, dropout=0.0, seed=SEED)
    init = m.lora_state("params")
    # reference log-probs per micro-batch, packed exactly as in training: the packed
    # forward's float32 rounding depends on the batch composition (~1e-6), and only an
    # identically packed reference gives rewards of exactly 0 at step 0 (as TRL's does)
    ref = np.zeros((len(pairs), 2))
    for k in range(0, len(pairs), micro):
        t, s = tm.pack(pairs[k:k + micro])
        ref[k:k + micro] = m.score(t, s, use_lora=False)["logp"]
    logs = []
    for step in range(STEPS):
        m.zero_grad()
        idx = list(range(step * per_step, (step + 1) * per_step))
        outs = []
        for k in range(0, per_step, micro):
            chunk = idx[k:k + micro]
            t, s = tm.pack([pairs[i] for i in chunk])
            outs.append(m.train_step(t, s, np.ascontiguousarray(ref[chunk]), objective,
                                     weight=1.0 / per_step, dropout_seed=0))
        cat = lambda key: np.concatenate([o[key] for o in outs])
        lr_used = _core.lr_at(sched, lr, step, STEPS, 0)
        gn = m.optimizer_step(lr_used, 0.9, 0.999, 1e-8, 0.0, 1.0)
        rw, logp, n = cat("reward"), cat("logp"), cat("n").astype(np.float64)
        e = {"loss": cat("loss").mean(), "grad_norm": gn, "lr_used": lr_used,
             "rewards/chosen": rw[:, 0].mean(), "rewards/rejected": rw[:, 1].mean(),
             "rewards/margins": (rw[:, 0] - rw[:, 1]).mean(),
             "rewards/accuracies": (rw[:, 0] > rw[:, 1]).mean()}
        if objective["kind"] == "dpo":
            e["logps/chosen"], e["logps/rejected"] = logp[:, 0].mean(), logp[:, 1].mean()
        else:
            e["logps/chosen"], e["logps/rejected"] = (logp[:, 0] / n[:, 0]).mean(), (logp[:, 1] / n[:, 1]).mean()
        if objective["kind"] == "orpo":
            e["nll_loss"] = cat("nll").mean()
            e["log_odds_ratio"] = cat("log_sig_odds").mean()
            e["log_odds_chosen"] = cat("log_odds").mean()
        logs.append(e)
    return init, logs, m.lora_state("params")


CASES = {
    # kind: (objective for prefopt, TRL hyper-parameters, lr, schedule, per_device, accum, bos_only)
    "dpo": ({"kind": "dpo", "beta": 0.5}, {"beta": 0.5}, 5e-3, "linear", 2, 1, False),
    "simpo": ({"kind": "simpo", "beta": 2.0, "gamma": 0.5}, {"beta": 2.0, "gamma": 0.5}, 5e-3, "cosine", 2, 1,
              False),
    "orpo": ({"kind": "orpo", "lambda": 0.5}, {"lambda": 0.5}, 5e-3, "linear", 1, 2, True),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_matches_trl_for_five_steps(kind):
    objective, hp, lr, sched, per_device, accum, bos_only = CASES[kind]
    per_step = per_device * accum
    rows = text_pairs(STEPS * per_step, seed=11, bos_only_prompt=bos_only)
    trainer = run_trl(kind, rows, lr, sched, per_device, accum, hp)
    pairs = token_pairs(trainer, kind)
    assert len(pairs) == STEPS * per_step
    if bos_only:
        assert all(p == [1] for p, _, _ in pairs)
    else:
        assert max(len(p) for p, _, _ in pairs) > 2  # real shared prompts

    init, ours, final = run_prefopt(pairs, objective, lr, sched, per_step, per_device)
    copy_initial_lora(trainer, init)
    trainer.train()
    theirs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert len(theirs) == STEPS

    keys = [k for k in ours[0] if k != "lr_used"]
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in keys:
            assert k in b, f"TRL did not log {k}: {sorted(b)}"
            tol = TOL * max(1.0, abs(b[k]))
            assert abs(a[k] - b[k]) <= tol, f"{kind} step {step + 1} {k}: prefopt {a[k]!r} TRL {b[k]!r}"
        # transformers 5.x logs the lr the update just made used (captured before the
        # scheduler steps); older versions logged the next one
        assert b["learning_rate"] == pytest.approx(a["lr_used"], rel=1e-12, abs=1e-18)
    # the runs actually moved, and the adapters agree at the end
    assert ours[-1]["loss"] != pytest.approx(ours[0]["loss"], abs=1e-3)
    trl_final = peft_state(trainer)
    assert set(trl_final) == set(final)
    for k in final:
        np.testing.assert_allclose(final[k], trl_final[k], rtol=0, atol=1e-4, err_msg=k)
    if kind == "dpo":  # hand value at step 1: policy == reference
        assert ours[0]["loss"] == pytest.approx(np.log(2), abs=1e-7)
        assert ours[0]["rewards/accuracies"] == 0.0
