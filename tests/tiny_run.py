"""The settings of the tiny pretraining runs that the end-to-end tests launch: a small
model in fp64 on the EMT test data, every step logged, no validation, no progress bar."""

TINY_RUN = (
    "model.hidden=16",
    "model.layers=2",
    "model.num_rbf=8",
    "model.radial_hidden=8",
    "model.cutoff=4.0",
    "data.max_atoms=64",
    "data.split=[0.7, 0.15, 0.15]",
    "train.precision=fp64",
    "train.log_every=1",
    "validate.every=0",
    "train.progress=false",
)
