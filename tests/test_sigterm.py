"""SIGTERM (kill, timeout, job schedulers) during a run is handled like Ctrl-C: the
checkpoint and log are saved, and rerunning resumes to the same end state as an
uninterrupted run. Found by a fresh user: before, SIGTERM lost the run's work."""
import json
import os
import signal

import pytest
from test_train import VOCAB, adapter_bytes, cfg
from toymodel import ToyModel, random_pairs

from prefopt.train import train


class TermAt:
    def __init__(self, at):
        self.at = at

    def __call__(self, step, entry):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_and_resumes(tmp_path):
    tr, ev = random_pairs(10, VOCAB), random_pairs(4, VOCAB, seed=1)
    c = cfg(max_steps=6, logging_steps=1)  # no periodic checkpoints: only the signal saves
    full = train(ToyModel(), tr, ev, c, tmp_path / "full", progress=False, name="run")
    with pytest.raises(KeyboardInterrupt):
        train(ToyModel(), tr, ev, c, tmp_path / "term", progress=False, callback=TermAt(2),
              name="run")
    state = json.loads((tmp_path / "term/checkpoint/state.json").read_text())
    assert state["step"] == 2 and not state["completed"]
    # the handler is restored after the run
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    res = train(ToyModel(), tr, ev, c, tmp_path / "term", progress=False, name="run")
    assert adapter_bytes(res.adapter_path) == adapter_bytes(full.adapter_path)
    assert [e["loss"] for e in res.train_entries()] == [e["loss"] for e in full.train_entries()]
