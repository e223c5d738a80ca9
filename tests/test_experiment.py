"""The ablation matrix: structure, fixed settings, refusal to compare runs that differ."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from prefopt import experiment  # noqa: E402
from prefopt.train import TrainConfig  # noqa: E402
from toymodel import ToyModel, random_pairs  # noqa: E402

VOCAB = 32


def base(**kw):
    d = dict(max_steps=3, pairs_per_step=4, micro_batch_size=2, learning_rate=5e-2, eval_every=2,
             seed=1, lora_targets=("q", "v"))
    d.update(kw)
    return TrainConfig(**d)


@pytest.fixture
def data():
    return random_pairs(12, VOCAB), random_pairs(6, VOCAB, seed=7)


def test_matrix_structure(tmp_path, data):
    res = experiment.ablate(ToyModel(), data, objectives=["dpo", "simpo"], ranks=[4, 2],
                            base_config=base(), out_dir=tmp_path, progress=False,
                            objective_params={"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.3}})
    names = [r.name for r in res.runs]
    assert names == ["dpo-r4", "dpo-r2", "simpo-r4", "simpo-r2"]
    for r in res.runs:
        d = tmp_path / r.name
        assert (d / "log.jsonl").exists() and (d / "adapter" / "adapter_model.safetensors").exists()
        assert (d / "result.json").exists()
        assert r.heldout.n == 6 and r.baseline is not None
        cfg = r.settings
        assert cfg["lora_rank"] == r.rank and cfg["objective"] == r.objective
        assert cfg["fixed"] == res.runs[0].settings["fixed"]
    simpo = [r for r in res.runs if r.objective == "simpo"][0]
    assert simpo.settings["objective_params"]["gamma"] == pytest.approx(0.6)
    assert res.runs[0].settings["objective_params"] == {"kind": "dpo", "beta": 0.1,
                                                        "label_smoothing": 0.0}
    # baseline once, at the base model: ref margins are 0 by construction
    assert all(p.ref_margin == 0.0 for p in res.baseline.pairs)
    assert json.loads((tmp_path / "baseline.json").read_text())["pairs"]
    # table: one row per run plus the base model
    rows = res.table.to_dict("records") if hasattr(res.table, "to_dict") else res.table
    assert [r["run"] for r in rows] == ["base"] + names
    assert (tmp_path / "table.csv").exists() and (tmp_path / "report.md").exists()
    text = (tmp_path / "report.md").read_text()
    assert res.verdict.text.splitlines()[0] in text
    # rerunning returns the saved runs (resume of finished runs) with identical numbers
    res2 = experiment.ablate(ToyModel(), data, objectives=["dpo", "simpo"], ranks=[4, 2],
                             base_config=base(), out_dir=tmp_path, progress=False,
                             objective_params={"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.3}})
    assert [r.heldout.to_dict() for r in res2.runs] == [r.heldout.to_dict() for r in res.runs]


def test_refuses_runs_with_different_fixed_settings(tmp_path, data):
    a = experiment.ablate(ToyModel(), data, objectives=["dpo", "simpo"], ranks=[2],
                          base_config=base(), out_dir=tmp_path / "a", progress=False,
                          plots=False, report=False)
    b = experiment.ablate(ToyModel(), data, objectives=["dpo", "simpo"], ranks=[2],
                          base_config=base(learning_rate=1e-2), out_dir=tmp_path / "b",
                          progress=False, plots=False, report=False)
    with pytest.raises(ValueError, match="learning_rate"):
        experiment.check_comparable([a.runs[0], b.runs[1]])
    # previously saved runs with other settings are refused too
    with pytest.raises(ValueError, match="refusing to compare"):
        experiment.ablate(ToyModel(), data, objectives=["dpo", "simpo"], ranks=[2],
                          base_config=base(), out_dir=tmp_path / "c", progress=False,
                          previous_runs=[tmp_path / "b" / "simpo-r2"], plots=False, report=False)
    # ... and accepted when they match: the saved run is reused, not retrained
    c = experiment.ablate(ToyModel(), data, objectives=["dpo", "simpo"], ranks=[2],
                          base_config=base(), out_dir=tmp_path / "d", progress=False,
                          previous_runs=[tmp_path / "a" / "simpo-r2"], plots=False, report=False)
    assert [r.name for r in c.runs] == ["dpo-r2", "simpo-r2"]
    assert not (tmp_path / "d" / "simpo-r2").exists()
    # different held-out pairs are a different fixed setting
    other = (data[0], random_pairs(6, VOCAB, seed=8))
    d = experiment.ablate(ToyModel(), other, objectives=["dpo", "simpo"], ranks=[2],
                          base_config=base(), out_dir=tmp_path / "e", progress=False,
                          plots=False, report=False)
    with pytest.raises(ValueError, match="heldout_ids|data_hash"):
        experiment.check_comparable([a.runs[0], d.runs[1]])


def test_objective_parameters_go_per_objective(tmp_path, data):
    with pytest.raises(ValueError, match="objective_params"):
        experiment.ablate(ToyModel(), data, base_config=TrainConfig(beta=0.2),
                          out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="not in the ablation"):
        experiment.ablate(ToyModel(), data, objective_params={"orpo": {"orpo_lambda": 0.2}},
                          out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="may only set"):
        experiment.ablate(ToyModel(), data, objective_params={"dpo": {"learning_rate": 1.0}},
                          out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="at least two runs"):
        experiment.ablate(ToyModel(), data, objectives=["dpo"], ranks=[2], out_dir=tmp_path)


def test_split_of_one_list(tmp_path):
    pairs = random_pairs(15, VOCAB)
    tr, he = experiment._split(None, pairs, 5, None, 0)
    assert len(tr) == 10 and len(he) == 5 and not {p.id for p in tr} & {p.id for p in he}
    tr, he = experiment._split(None, pairs, None, ["p1", "p2"], 0)
    assert [p.id for p in he] == ["p1", "p2"]


def test_cli_flags_map_to_configs():
    from prefopt.__main__ import DEFAULTS, build_parser, configs_from_args

    p = build_parser()
    base, params = configs_from_args(p.parse_args(["ablate"]))
    assert base.max_steps == DEFAULTS["max_steps"] and base.objective == "dpo"
    assert params == {"dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0},
                      "simpo": {"beta": 2.0, "sft_weight": 0.0, "gamma_beta_ratio": 0.5}}
    args = p.parse_args(["ablate", "--objectives", "dpo,orpo", "--ranks", "4,2", "--lr", "1e-3",
                         "--steps", "7", "--lora-targets", "q,v", "--orpo-lambda", "0.2",
                         "--max-prompt-length", "0", "--simpo-gamma", "0.3"])
    base, params = configs_from_args(args)
    assert args.ranks == [4, 2] and base.learning_rate == 1e-3 and base.max_steps == 7
    assert base.targets == ("q_proj", "v_proj") and base.max_prompt_length is None
    assert params == {"dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0},
                      "orpo": {"orpo_lambda": 0.2}}
    with pytest.raises(SystemExit):
        p.parse_args(["ablate", "--simpo-gamma", "0.3", "--gamma-beta-ratio", "0.5"])
