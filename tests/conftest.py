"""Shared test fixtures: paths to the shared data and the real SmolLM2 model."""
import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PREFOPT_SHARED", REPO.parent / "shared"))
HH_PATH = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.fixture(scope="session")
def hh_path():
    assert HH_PATH.exists(), f"shared HH data not found at {HH_PATH} (set PREFOPT_SHARED)"
    return HH_PATH


@pytest.fixture(scope="session")
def hh_records(hh_path):
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into the user cache."""
    from prefopt import models

    return Path(models.fetch_path("smollm2-135m-instruct"))
