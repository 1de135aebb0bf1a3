"""Model families: one home for what differs between SD 1.x, SD 2.x, SDXL and the demo model."""

from __future__ import annotations

import pytest
import torch
from golden_runs import DEMO_MODEL, GOLDEN, RUNS, train_run


@pytest.fixture()
def models(request) -> dict:
    """The model a golden run trains on, built lazily so each run pays only for its own."""
    fixtures = {"tiny-epsilon": "tiny_model", "tiny-v": "tiny_vpred_model", "tiny-sdxl": "tiny_sdxl_model"}
    return lambda name: DEMO_MODEL if name == "demo" else request.getfixturevalue(fixtures[name])


@pytest.mark.parametrize("run", list(RUNS))
def test_training_is_unchanged_by_the_family_seams(run, models, tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    golden = load_file(str(GOLDEN / f"{run}.safetensors"))
    trained = train_run(run, models(RUNS[run]), tmp_path)
    assert sorted(trained) == sorted(golden)
    differing = [key for key in golden if not torch.equal(trained[key], golden[key])]
    assert not differing, f"{len(differing)} of {len(golden)} tensors differ, first {differing[0]}"
