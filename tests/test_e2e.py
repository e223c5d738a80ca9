"""End to end on the real SmolLM2-135M-Instruct and Anthropic HH pairs: the whole 2x2
objective x rank matrix through the CLI entry point, with a tiny setting (16 train + 8
held-out pairs, 2 steps per run, short lengths)."""
import json

import pytest

import prefopt
from prefopt.__main__ import main


def test_cli_ablation_on_smollm2_and_hh(smollm2_gguf, hh_path, tmp_path, capsys):
    out = tmp_path / "ablation"
    rc = main(["ablate", "--model", str(smollm2_gguf), "--data", str(hh_path), "--hh-to-chat", "--skip-invalid",
               "--limit", "24", "--heldout", "8", "--objectives", "dpo,simpo", "--ranks", "16,8",
               "--steps", "2", "--pairs-per-step", "2", "--micro-batch", "2",
               "--max-length", "128", "--max-prompt-length", "64", "--eval-every", "0",
               "--lr", "1e-3", "--threads", "1", "--no-progress", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["n"] == 8 and verdict["outcome"] in ("decision", "hint", "no evidence")
    # the printed and the written verdict are the same text
    assert verdict["text"].splitlines()[0] in printed
    report = (out / "report.md").read_text()
    assert verdict["text"].splitlines()[0] in report
    assert "12.5" in report  # one held-out pair = 100/8 points
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert {"margins.png", "rewards.png", "slice_accuracy.png"} <= set(plots)
    for p in (out / "plots").glob("*.png"):
        assert p.stat().st_size > 1000
    runs = ["dpo-r16", "dpo-r8", "simpo-r16", "simpo-r8"]
    for name in runs:
        d = out / name
        log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        train = [e for e in log if "rewards/margins" in e and "loss" in e]
        assert [e["step"] for e in train] == [1, 2]
        assert all(e["grad_norm"] > 0 for e in train)
        ev = [e for e in log if "eval_loss" in e]
        assert [e["step"] for e in ev] == [0, 2]
        cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
        assert cfg["r"] == int(name.split("-r")[1]) and cfg["peft_type"] == "LORA"
        assert (d / "adapter" / "adapter_model.safetensors").stat().st_size > 0
        res = json.loads((d / "result.json").read_text())
        assert res["heldout"] and len(res["heldout"]["pairs"]) == 8
    dpo = [json.loads(x) for x in (out / "dpo-r16" / "log.jsonl").read_text().splitlines()]
    first = next(e for e in dpo if "rewards/margins" in e and "loss" in e)
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-5)  # policy == reference
    # the table lists the base model and the four runs
    table = (out / "table.csv").read_text().splitlines()
    assert len(table) == 1 + 1 + 4


def test_cli_version_and_show_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert prefopt.__version__ in capsys.readouterr().out
    assert main(["show-config"]) == 0
    assert "OpenBLAS" in capsys.readouterr().out
