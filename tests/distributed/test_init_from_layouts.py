"""Fine-tuning into another layout under torchrun: a one-process run (or its consolidated
folder) starts a tensor-parallel run with every weight in place; a time budget stops every
rank at the same step."""

import pytest
import torch
from test_pretrain import pretrain

from megagnn.convert import consolidate
from megagnn.inference import load_model


@pytest.mark.parametrize("source", ["checkpoint", "consolidated"])
def test_fine_tuning_starts_a_tensor_parallel_run_from_one_process(emt_dataset, tmp_path, source):
    pretrained = tmp_path / "pretrained"
    pretrain(1, pretrained, emt_dataset, "train.max_steps=2")
    init = pretrained
    if source == "consolidated":
        init = tmp_path / "consolidated"
        consolidate(pretrained, init, progress=False)
    # learning rate x 0: the fine-tuned run's weights stay the pretrained ones, so its
    # checkpoint shows where each rank's slice was loaded; the time budget ends the run
    out = pretrain(
        2,
        tmp_path / "tuned",
        emt_dataset,
        "parallel.tensor=2",
        f"finetune.init_from={init}",
        "optim.lr_multipliers=['*=0.0']",  # quoted: a bare * is a YAML alias
        "optim.ema_decay=0.5",
        "train.time_budget=6",
    )
    assert "fine-tuning from" in out and "time budget: stopped at step" in out
    before = load_model(pretrained).state_dict()
    after = load_model(tmp_path / "tuned").state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
