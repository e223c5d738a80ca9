"""Guards found by a user trying to break the core: absurd LoRA ranks, non-finite adapters."""
import numpy as np
import pytest

import prefopt  # noqa: F401
from tiny_models import make_model, to_prefopt


@pytest.fixture(scope="module")
def core():
    return to_prefopt(make_model("llama"))


def test_rank_above_smaller_side_is_refused_fast(core):
    d = core.config["hidden_size"]
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        core.lora_init(100000, 1.0, ["q_proj"])
    with pytest.raises(ValueError, match="exceeds the smaller side"):
        core.lora_init(d + 1, 1.0, ["q_proj"])
    core.lora_init(d, 1.0, ["q_proj"])  # rank == min(out, in) is allowed
    assert core.lora_info()["rank"] == d


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_adapter_state_is_refused_and_changes_nothing(core, bad):
    core.lora_init(2, 4.0, ["q_proj", "v_proj"], seed=3)
    state = core.lora_state()
    before = {k: v.copy() for k, v in state.items()}
    name = sorted(state)[-1]
    state[name][0, -1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        core.lora_load_state(state)
    after = core.lora_state()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
