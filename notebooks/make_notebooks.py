"""Writes quickstart.ipynb and ablation.ipynb (run: python notebooks/make_notebooks.py).

The notebooks are kept as generated, unexecuted; CI executes them with
PREFOPT_NOTEBOOK_SMALL=1 (tests/test_notebooks.py)."""
from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

SETUP = '''import os, time
import prefopt

# Small setting for CI: PREFOPT_NOTEBOOK_SMALL=1 runs every cell in a minute or two.
SMALL = os.environ.get("PREFOPT_NOTEBOOK_SMALL", "0") == "1"
prefopt.set_num_threads(1 if SMALL else (os.cpu_count() or 1))
prefopt.show_config();'''


def quickstart():
    md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
    cells = [
        md("# prefopt quickstart\n\n"
           "One LoRA preference-tuning run on a real model: SmolLM2-135M-Instruct (fetched once "
           "into the user cache) and the sales-conversation pairs shipped with prefopt. "
           "The C core does the forward, backward and AdamW; Python orders the data, logs "
           "TRL-named metrics and evaluates on held-out pairs.\n\n"
           "Set `PREFOPT_NOTEBOOK_SMALL=1` for a tiny, fast setting."),
        code(SETUP),
        md("## Model and data\n\n`prefopt.models.fetch` downloads the GGUF of SmolLM2-135M-Instruct "
           "once; `prefopt.load` also takes a GGUF file or a Hugging Face model directory."),
        code('''from prefopt import models, data
from prefopt.__main__ import shipped_data_path

model = models.fetch("smollm2-135m-instruct")
print(model)
pairs = data.load_pairs(shipped_data_path())
print(len(pairs), "pairs")'''),
        code('''train_pairs, heldout_pairs = data.split_pairs(pairs)   # the file's split field: 88 / 22
if SMALL:
    train_pairs, heldout_pairs = train_pairs[:4], heldout_pairs[:4]
print(len(train_pairs), "train,", len(heldout_pairs), "held-out pairs")
p = train_pairs[0]
print("slice:", p.slice)
print("prompt:", p.prompt[-1]["content"])
print("chosen:", p.chosen[0]["content"][:300])
print("rejected:", p.rejected[0]["content"][:300])'''),
        md("## One DPO run\n\n`TrainConfig` holds every setting (see its docstring). Like TRL, "
           "prefopt disables all dropout - LoRA's included - unless `disable_dropout=False`."),
        code('''from prefopt.train import TrainConfig, train

config = TrainConfig(
    objective="dpo", beta=0.1,
    lora_rank=8, lora_targets="all-linear",
    learning_rate=2e-4, lr_schedule="linear", warmup_steps=1,
    max_steps=2 if SMALL else 11, pairs_per_step=2 if SMALL else 8, micro_batch_size=2 if SMALL else 4,
    max_length=128 if SMALL else 384, max_prompt_length=64 if SMALL else 256,
    eval_every=0 if SMALL else 11, seed=42,
)
t0 = time.time()
run = train(model, train_pairs, heldout_pairs, config, out_dir="quickstart-run", overwrite=True)
print(f"{time.time() - t0:.0f}s")'''),
        md("The JSONL log uses TRL's names (`loss`, `grad_norm` before clipping, `learning_rate`, "
           "`rewards/*`, `logps/*`; held-out entries prefixed `eval_`)."),
        code('''import pandas as pd

log = pd.DataFrame(run.train_entries())
log[["step", "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected",
     "rewards/margins", "rewards/accuracies"]]'''),
        md("## Held-out evaluation\n\nThe same for every objective: per pair, `avg` preference "
           "(Lc/nc > Lr/nr) and `ref` preference ((Lc-Rc) > (Lr-Rr)), with margins, overall "
           "and per slice. The base model (adapter off) is the baseline."),
        code('''from prefopt.evaluate import evaluate

base = evaluate(model, heldout_pairs, use_lora=False)
after = run.heldout
print("base   avg accuracy:", base.accuracy("avg"), " margin:", round(base.mean_margin("avg"), 4))
print("tuned  avg accuracy:", after.accuracy("avg"), " margin:", round(after.mean_margin("avg"), 4))
print("tuned  ref accuracy:", after.accuracy("ref"), " margin:", round(after.mean_margin("ref"), 4))
pd.DataFrame([after.agnostic_metrics()])'''),
        md("## A greedy reply with the adapter\n\nGeneration runs in the C core with a KV cache."),
        code('''import numpy as np

tok = model.tokenizer
q = heldout_pairs[0]
prompt_ids = np.array(tok.encode(tok.render_chat(q.prompt, add_generation_prompt=True)), dtype=np.int32)
ids = model.core.generate(prompt_ids, 24 if SMALL else 96, np.array([tok.eos_id], dtype=np.int32))
print(tok.decode([int(i) for i in ids], skip_special=True))'''),
        md("The adapter is saved in PEFT format (`quickstart-run/adapter/`): "
           "`peft.PeftModel.from_pretrained` loads it on the transformers model."),
        code('''sorted(os.listdir("quickstart-run/adapter"))'''),
    ]
    return cells


def ablation():
    md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
    cells = [
        md("# The objective x rank ablation on real data\n\n"
           "Which preference objective to keep? `prefopt.experiment.ablate` runs DPO and SimPO at "
           "LoRA ranks 16 and 8 with everything else fixed (model, split, seed, pairs, lengths, "
           "steps, LR, batch, evaluation), evaluates every run on the same held-out pairs, "
           "reviews over-optimisation and applies the decision rule with paired statistics.\n\n"
           "Part 1 uses the shipped sales pairs (the `python -m prefopt ablate` defaults); part 2 "
           "the Anthropic HH harmless test set. `PREFOPT_NOTEBOOK_SMALL=1` shrinks both."),
        code(SETUP),
        code('''from prefopt import models, data
from prefopt.__main__ import DEFAULTS, shipped_data_path
from prefopt.experiment import ablate
from prefopt.train import TrainConfig

model = models.fetch("smollm2-135m-instruct")
sales = data.load_pairs(shipped_data_path())
print(len(sales), "pairs; slices:", sorted({p.slice for p in sales}))'''),
        md("## Part 1: sales conversations\n\nThe fixed settings are one `TrainConfig`; the "
           "objectives' own parameters (beta, gamma) go in `objective_params`."),
        code('''if SMALL:
    train_p, held_p = data.split_pairs(sales)
    pairs = (train_p[:4], held_p[:4])
    base = TrainConfig(max_steps=1, pairs_per_step=2, micro_batch_size=2, max_length=128,
                       max_prompt_length=64, learning_rate=1e-3, eval_every=0)
else:
    pairs = sales                      # split by the file's split field (88 / 22)
    base = TrainConfig(**DEFAULTS)
params = {"dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5}}
t0 = time.time()
res = ablate(model, pairs, objectives=["dpo", "simpo"], ranks=[16, 8], base_config=base,
             objective_params=params, out_dir="ablation-sales")
print(f"{time.time() - t0:.0f}s")'''),
        code('''res.table'''),
        code('''print(res.verdict.text)'''),
        md("Plots (also linked from `ablation-sales/report.md`): train vs held-out margins over "
           "steps, chosen vs rejected rewards, held-out accuracy per slice."),
        code('''from IPython.display import Image, display
for p in res.plot_paths:
    display(Image(filename=str(p)))'''),
        md("## Part 2: Anthropic HH (harmless-base test)\n\nHH pairs are text with implicit "
           "prompts; `hh_to_chat=True` turns them into chat messages for the instruct model's "
           "template. A seeded split holds out 20%."),
        code('''from pathlib import Path
hh_file = Path(os.environ.get("PREFOPT_SHARED", "../../shared")) / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
if not hh_file.exists():
    hh_file = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
n = 12 if SMALL else 200
hh = data.load_pairs(hh_file, hh_to_chat=True, limit=n, skip_invalid=True)
print(len(hh.skipped), "malformed records skipped")
hh_base = base.replace(max_length=128 if SMALL else 256, max_prompt_length=64 if SMALL else 128)
res_hh = ablate(model, hh, objectives=["dpo", "simpo"], ranks=[16, 8], base_config=hh_base,
                objective_params=params, heldout=4 if SMALL else 40, split_seed=0,
                out_dir="ablation-hh")
res_hh.table'''),
        code('''print(res_hh.verdict.text)'''),
        md("Runs whose fixed settings differ are refused, also when they were saved earlier:"),
        code('''from prefopt.experiment import check_comparable
try:
    check_comparable([res.runs[0], res_hh.runs[1]])
except ValueError as e:
    print("refused:", str(e)[:300])'''),
    ]
    return cells


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, HERE / name)


if __name__ == "__main__":
    write("quickstart.ipynb", quickstart())
    write("ablation.ipynb", ablation())
