"""Multi-dataset pretraining: EMT metals and GFN2 molecules, one head each on a shared trunk."""

import ase.io
import numpy as np
import pytest
import torch

from megagnn import keys as K
from megagnn.config import ConfigError, load_config
from megagnn.data.preprocess import preprocess
from megagnn.training.trainer import Trainer

pytest.importorskip("tblite", reason="the molecule data needs tblite (pip install tblite)")


@pytest.fixture(scope="module")
def molecule_dataset(tmp_path_factory):
    from megagnn.data.molecules import generate

    raw = tmp_path_factory.mktemp("mol") / "raw.extxyz"
    ase.io.write(raw, list(generate(32, seed=0, progress=False)))
    out = raw.parent / "processed"
    preprocess([str(raw)], out, cutoff=4.0, progress=False)
    return out


def config(tmp_path, metals, molecules, *extra, reverse=False):
    entries = [
        f"{{path: {metals}, head: metals, weight: 3}}",
        f"{{path: {molecules}, head: molecules, weight: 1}}",
    ]
    if reverse:
        entries.reverse()
    return load_config(
        None,
        [
            "model.heads=[metals, molecules]",
            f"data.datasets=[{', '.join(entries)}]",
            "model.hidden=8",
            "model.layers=1",
            "model.cutoff=4.0",
            "data.max_atoms=64",
            "data.split=[0.6, 0.2, 0.2]",
            "train.precision=fp64",
            "train.progress=false",
            f"train.out_dir={tmp_path}",
            *extra,
        ],
    )


def test_two_datasets_train_their_own_heads(emt_dataset, molecule_dataset, tmp_path):
    cfg = config(tmp_path, emt_dataset, molecule_dataset, "train.max_steps=6", "validate.every=6")
    trainer = Trainer(cfg)
    ref = trainer.potential.atomic_energies
    assert ref[0, 29] != 0 and ref[0, 1] == 0  # metals head: Cu yes, H no
    assert ref[1, 1] != 0 and ref[1, 29] == 0  # molecules head: H yes, Cu no
    trainer.train()
    val = [r for r in map(eval_json, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    keys = set().union(*val)
    assert {"val/metals/forces_mae", "val/molecules/forces_mae"} <= keys
    assert "val/molecules/stress_mae" not in keys  # molecules carry no stress
    positions = trainer.common_state()["data"]["sources"]
    assert len(positions) == 2 and all(p["batch_in_epoch"] + p["epoch"] > 0 for p in positions)


def eval_json(line):
    import json

    return json.loads(line)


def test_batches_follow_the_weights_and_carry_their_head(emt_dataset, molecule_dataset, tmp_path):
    trainer = Trainer(config(tmp_path, emt_dataset, molecule_dataset, "train.microbatches=4"))
    heads = []
    for step in range(50):
        trainer.step = step
        for batch in trainer.next_batches():
            (head,) = batch[K.HEAD].unique().tolist()  # one dataset per batch
            is_molecule = bool((batch[K.ATOMIC_NUMBERS] == 1).any())
            assert head == int(is_molecule)
            heads.append(head)
    share = np.mean(np.array(heads) == 0)
    assert 0.65 < share < 0.85  # weights 3:1
    again = Trainer(config(tmp_path / "b", emt_dataset, molecule_dataset, "train.microbatches=4"))
    again.step = 7
    trainer.step = 7
    draws = [b[K.HEAD][0].item() for b in again.next_batches()]
    rng = np.random.default_rng([0, 7])
    assert draws == rng.choice(2, size=4, p=[0.75, 0.25]).tolist()  # seeded by the step
    # each head's scale is its own dataset's training-split force RMS
    stats = {d["head"]: d for d in trainer.statistics["datasets"]}
    scale = trainer.potential.scale.tolist()
    assert scale[0] == pytest.approx(stats["metals"]["force_rms"])
    assert scale[1] == pytest.approx(stats["molecules"]["force_rms"])
    assert abs(scale[0] - scale[1]) > 0.1 * scale[0]


def test_statistics_do_not_depend_on_the_order_of_the_datasets(
    emt_dataset, molecule_dataset, tmp_path
):
    a = Trainer(config(tmp_path / "a", emt_dataset, molecule_dataset))
    b = Trainer(config(tmp_path / "b", emt_dataset, molecule_dataset, reverse=True))
    for name, value in a.potential.named_buffers():
        assert torch.equal(value, dict(b.potential.named_buffers())[name]), name
    # the neighbour normaliser pools both datasets' training atoms (~40 neighbours in the
    # metals, far fewer in the molecules): neither dataset's own value
    per = [d["avg_num_neighbors"] for d in a.statistics["datasets"]]
    pooled = float(a.potential.avg_num_neighbors)
    assert min(per) < pooled < max(per)


def test_unknown_head_is_a_config_error(emt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="not in model.heads"):
        load_config(None, [f"data.datasets=[{{path: {emt_dataset}, head: oops}}]"])
