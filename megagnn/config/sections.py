"""The config sections: one keyword-only dataclass per concern, each field with a one-line
docstring and validation in ``__post_init__`` whose message says what to change. The tree
that holds them, and its YAML loading, live in ``megagnn.config.tree``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config value or key is wrong; the message says what to change."""


# optional libraries that run IrrepNet's tensor products: choice -> (module, how to install)
ACCELERATORS = {
    "cueq": (
        "cuequivariance_torch",
        "cuequivariance-torch (pip install cuequivariance-torch; on GPUs also "
        "cuequivariance-ops-torch-cu12)",
    ),
    "oeq": ("openequivariance", "OpenEquivariance and a CUDA GPU (pip install openequivariance)"),
}


@dataclass(kw_only=True)
class ModelConfig:
    family: str = "painn"
    """Backbone: 'schnet' (continuous filters), 'painn' (equivariant vectors), 'egnn'
    (Satorras et al. 2021, invariant messages from both atoms' features and the distance)
    or 'irrep' (features of degree up to model.lmax, tensor-product messages)."""
    hidden: int = 64
    """Channel width H of every block."""
    lmax: int = 2
    """model.family=irrep: the largest degree L of node features and spherical harmonics."""
    correlation: int = 1
    """model.family=irrep: body order of the node update, 1 (the neighbour sum A) or 2 (also
    A ⊗ A, channel-wise: MACE's product basis to second order)."""
    tensor_product: str = "auto"
    """model.family=irrep: what runs the channel-wise tensor products. 'e3nn' (megagnn's
    written-out contraction of e3nn's Clebsch-Gordan coefficients), 'cueq' (the same
    products as cuequivariance-torch polynomials: its CUDA kernel with
    cuequivariance-ops-torch installed, else its plain-PyTorch method), 'oeq' (the edge
    product by OpenEquivariance's generated kernels; CUDA only) or 'auto' (cueq on CUDA
    where its kernels are installed, else e3nn). All give the same numbers and weights."""
    layers: int = 3
    """Number of interaction blocks L."""
    num_rbf: int = 16
    """Number of radial basis functions."""
    radial_hidden: int = 64
    """Hidden width of the radial filter MLP (kept small: its [E, R] activation is the one edge
    tensor that tensor parallelism does not split)."""
    rbf: str = "bessel"
    """Radial basis: 'gaussian' or 'bessel'."""
    cutoff: float = 5.0
    """Neighbour cutoff in Å; the envelope goes smoothly to zero there."""
    envelope_p: int = 6
    """Exponent p of the polynomial cutoff envelope (DimeNet eq. 8)."""
    max_z: int = 100
    """Largest atomic number the embedding covers."""
    forces: str = "conservative"
    """'conservative' (F = -dE/dx), 'direct' (equivariant edge head) or 'none'."""
    stress: bool = True
    """Predict stress from the strain derivative for periodic cells (conservative only;
    model.forces=none implies false)."""
    heads: list[str] = field(default_factory=lambda: ["default"])
    """Names of the energy heads, one per dataset family, on a shared trunk."""
    parametrization: str = "sp"
    """'sp' (torch's default initialisation, one learning rate) or 'mup' (maximal update
    parametrisation: hidden and output weights train at lr x mup_base_width/width and output
    weights start smaller, so a learning rate tuned at the base width holds at any width)."""
    mup_base_width: int = 64
    """Under model.parametrization=mup, the width at which μP equals the standard one."""
    sized_for: str | None = None
    """The family a named size (configs/model/*.yaml) was sized for: with another
    model.family the run warns, giving the parameter count it gets instead."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_z <= 118:
            raise ConfigError(f"model.max_z={self.max_z}: use 1..118 (the periodic table)")
        if self.family not in ("schnet", "painn", "egnn", "irrep"):
            raise ConfigError(
                f"model.family={self.family!r}: use 'schnet', 'painn', 'egnn' or 'irrep'"
            )
        if not 1 <= self.lmax <= 4:
            raise ConfigError(f"model.lmax={self.lmax}: use 1..4")
        if self.correlation not in (1, 2) or (self.correlation > 1 and self.family != "irrep"):
            raise ConfigError(f"model.correlation={self.correlation}: use 1, or 2 with irrep")
        if self.tensor_product not in ("auto", "e3nn", *ACCELERATORS):
            raise ConfigError(
                f"model.tensor_product={self.tensor_product!r}: use 'auto', 'e3nn', 'cueq' or 'oeq'"
            )
        if self.tensor_product in ACCELERATORS:
            import importlib.util

            module, install = ACCELERATORS[self.tensor_product]
            if self.family != "irrep":
                raise ConfigError(
                    f"model.tensor_product={self.tensor_product} applies to model.family=irrep only"
                )
            if importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"model.tensor_product={self.tensor_product} needs {install}, or use "
                    "model.tensor_product=e3nn, which gives the same numbers"
                )
        if self.rbf not in ("gaussian", "bessel"):
            raise ConfigError(f"model.rbf={self.rbf!r}: use 'gaussian' or 'bessel'")
        if self.forces not in ("conservative", "direct", "none"):
            raise ConfigError(
                f"model.forces={self.forces!r}: use 'conservative', 'direct' or 'none'"
            )
        if min(self.hidden, self.layers, self.num_rbf, self.radial_hidden) < 1:
            raise ConfigError(
                "model.hidden, model.layers, model.num_rbf and model.radial_hidden must be >= 1"
            )
        if self.cutoff <= 0:
            raise ConfigError(f"model.cutoff={self.cutoff}: must be > 0 Å")
        if self.forces == "none":
            self.stress = False  # an energy-only model: no strain derivative either
        if self.stress and self.forces != "conservative":
            raise ConfigError(
                "model.stress=true needs model.forces=conservative (stress is dE/dstrain); "
                "set model.stress=false for direct forces"
            )
        if self.parametrization not in ("sp", "mup"):
            raise ConfigError(f"model.parametrization={self.parametrization!r}: use 'sp' or 'mup'")
        if self.mup_base_width < 1:
            raise ConfigError("model.mup_base_width must be >= 1")
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"model.heads={self.heads}: give one or more distinct names")


@dataclass(kw_only=True)
class DatasetSource:
    path: str
    """Dataset folder holding dataset.json and its HDF5 shards."""
    head: str = "default"
    """The model head (one of model.heads) whose energy this dataset trains."""
    weight: float = 1.0
    """Sampling weight: the expected share of training batches drawn from this dataset."""

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"data.datasets: {self.path} has weight {self.weight}; use > 0")


@dataclass(kw_only=True)
class DataConfig:
    path: str = "data/emt"
    """Dataset folder holding dataset.json and its HDF5 shards (used when datasets is empty)."""
    datasets: list[DatasetSource] = field(default_factory=list)
    """Several datasets in one run (multi-head pretraining), each with its own head, energy
    reference and sampling weight; each batch comes from one dataset. Empty: data.path alone,
    on the first head."""
    split: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])
    """Train/val/test fractions of the structures, drawn by split_seed."""
    split_seed: int = 0
    """Seed of the train/val/test split (fixed across runs so held-out data stays held out)."""
    split_file: str | None = None
    """An .npz with arrays train, val and test of record indices (int, dataset order) or
    record ids (str, as preprocessing stored them), used as given instead of data.split and
    data.split_seed (a published split); data.train_fraction still subsets its train part."""
    train_fraction: float = 1.0
    """Fraction of the train split to train on: a seeded subset, each smaller fraction inside
    the larger ones (the data axis of scaling studies; val and test stay whole)."""
    max_atoms: int = 512
    """Atom budget per batch (the GNN analogue of tokens per batch)."""
    max_edges: int | None = None
    """Optional edge budget per batch; needs shards preprocessed with the same cutoff."""
    num_workers: int = 0
    """DataLoader worker processes (each opens its own HDF5 handles)."""

    def __post_init__(self) -> None:
        if (
            len(self.split) != 3
            or any(f < 0 for f in self.split)
            or abs(sum(self.split) - 1) > 1e-6
        ):
            raise ConfigError(f"data.split={self.split}: give three fractions that sum to 1")
        if not 0 < self.train_fraction <= 1:
            raise ConfigError(f"data.train_fraction={self.train_fraction}: must lie in (0, 1]")
        if self.max_atoms < 1:
            raise ConfigError("data.max_atoms must be >= 1")
        if self.max_edges is not None and self.max_edges < 1:
            raise ConfigError("data.max_edges must be >= 1 or null")
        if self.split_file is not None and self.datasets:
            raise ConfigError(
                "data.split_file gives the split of data.path alone; with data.datasets "
                "leave it null"
            )


@dataclass(kw_only=True)
class TrainConfig:
    out_dir: str = "runs/default"
    """Run folder: checkpoints/, tensorboard/ and the resolved config.yaml."""
    max_steps: int = 1000
    """Optimizer steps to train for (unless train.epochs, train.flops_budget or
    train.time_budget is set)."""
    epochs: float | None = None
    """Passes over the training split instead of max_steps: the schedule grows with the data
    (a data-scaling point trained as long per structure as any other)."""
    flops_budget: float | None = None
    """Training compute instead of max_steps: FLOPs summed over ranks, forward and backward
    (the force loss's double backward included), from torch's FlopCounterMode count of one
    step per atom; the learning-rate schedule spans the budget."""
    time_budget: float | str | None = None
    """Wall-clock budget of the run, seconds or 'HH:MM:SS' (instead of max_steps): the
    learning-rate schedule follows the elapsed time and the run stops with a checkpoint
    before the budget ends (resumed runs count the time already spent)."""
    precision: str = "fp32"
    """'fp32', 'bf16' (autocast for the dense layers; geometry stays fp32) or 'fp64'."""
    seed: int = 0
    """Seed of initialisation, data order and dropout-free randomness."""
    microbatches: int = 1
    """Batches per optimizer step (gradient accumulation; the pipeline's microbatches)."""
    recompute_activations: bool = False
    """Keep only each block's input in forward and recompute the block in backward."""
    compile: bool = False
    """Train through one compiled graph of energy, forces and stress (make_fx of the force
    function, compiled by Inductor; megagnn.models.compiled): the first step compiles for
    minutes, later ones run faster. Validation and inference stay eager."""
    max_bad_steps: int = 20
    """Abort after this many consecutive steps with a non-finite loss or gradient."""
    deterministic: bool = False
    """Bitwise-reproducible steps on GPUs: torch's deterministic algorithms and no kernel
    that adds with atomics (the fused messages' backward takes the reference). CPU runs are
    deterministic either way."""
    threads: int | None = None
    """Intra-op threads of each process (null: this machine's cores divided among the
    processes torchrun starts on it, at least one)."""
    log_every: int = 10
    """Steps between TensorBoard scalar writes."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        budget = self.time_budget_s
        if budget is not None and (
            self.epochs is not None or self.flops_budget is not None or budget <= 0
        ):
            raise ConfigError(
                "train.time_budget must be > 0 and replaces train.epochs and "
                "train.flops_budget: keep one"
            )
        if self.precision not in ("fp32", "bf16", "fp64"):
            raise ConfigError(f"train.precision={self.precision!r}: use 'fp32', 'bf16' or 'fp64'")
        if self.max_steps < 1:
            raise ConfigError("train.max_steps must be >= 1")
        if self.microbatches < 1:
            raise ConfigError("train.microbatches must be >= 1")
        if self.epochs is not None and self.flops_budget is not None:
            raise ConfigError("train.epochs and train.flops_budget both set: keep one")
        if (self.epochs is not None and self.epochs <= 0) or (
            self.flops_budget is not None and self.flops_budget <= 0
        ):
            raise ConfigError("train.epochs and train.flops_budget must be > 0 (or null)")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("train.threads must be >= 1 (or null: the cores per process)")
        if self.log_every < 1 or self.max_bad_steps < 1:
            raise ConfigError("train.log_every and train.max_bad_steps must be >= 1")

    @property
    def time_budget_s(self) -> float | None:
        """train.time_budget in seconds (None without one)."""
        return None if self.time_budget is None else parse_duration(self.time_budget)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.01
    """Final learning rate as a fraction of lr, reached by the cosine decay."""
    warmup_steps: int = 50
    """Linear warmup steps before the cosine decay."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 10.0
    """Clip the global gradient norm to this value (0 disables)."""
    lr_multipliers: list[str] = field(default_factory=list)
    """'pattern=factor' entries: parameters matching the glob train at lr x factor (the first
    matching entry wins; others at lr), e.g. ['backbone.*=0.1'] for a gentle fine-tune."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (0: none; MACE and NequIP use ~0.99-0.999):
    validation, best checkpoints, evaluation, consolidation and packages use the averaged
    weights. The decay ramps as min(decay, (1 + n) / (10 + n)) over the first n updates."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio must lie in [0, 1]")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"optim.ema_decay={self.ema_decay}: use 0 (off) or a value in (0, 1)")
        for entry in self.lr_multipliers:
            pattern, _, factor = entry.rpartition("=")
            try:
                ok = bool(pattern) and float(factor) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(
                    f"optim.lr_multipliers: {entry!r}; write 'pattern=factor', factor >= 0"
                )


@dataclass(kw_only=True)
class LossConfig:
    energy_weight: float = 1.0
    """Weight of the energy term."""
    energy: str = "per_atom"
    """'per_atom': the energy error divided by the atom count (structures of every size
    weigh alike per atom); 'per_structure': the total energy error (QM9's practice)."""
    force_weight: float = 10.0
    """Weight of the force term."""
    stress_weight: float = 1.0
    """Weight of the stress term (stress times volume per atom, i.e. virial per atom)."""
    function: str = "mse"
    """'mse', 'huber' (delta 0.01 on each normalised term) or 'l1' (mean absolute error:
    what QM9 tables report)."""

    def __post_init__(self) -> None:
        if self.function not in ("mse", "huber", "l1"):
            raise ConfigError(f"loss.function={self.function!r}: use 'mse', 'huber' or 'l1'")
        if self.energy not in ("per_atom", "per_structure"):
            raise ConfigError(f"loss.energy={self.energy!r}: use 'per_atom' or 'per_structure'")


@dataclass(kw_only=True)
class ValidateConfig:
    every: int = 200
    """Steps between validation passes (0 disables)."""
    structures: int = 0
    """Validate periodically on a fixed seeded subset of at most this many validation
    structures per dataset (0: all). Early stopping watches it; megagnn.evaluate always
    reads the whole split."""
    patience: int = 0
    """Stop when the validation loss has not improved for this many validations (0: never);
    the best checkpoint is kept (checkpoints/best) and is what megagnn.evaluate reads."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError("validate.every must be >= 0 (0 disables validation)")
        if self.structures < 0:
            raise ConfigError("validate.structures must be >= 0 (0 validates on every one)")
        if self.patience < 0:
            raise ConfigError("validate.patience must be >= 0 (0 disables early stopping)")


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 200
    """Steps between checkpoints (the last step is always saved)."""
    every_s: float = 0.0
    """Also save when this many seconds passed since the last checkpoint (0: steps only)."""
    keep: int = 2
    """How many recent checkpoints to keep on disk (0: every one; the best one is kept
    besides)."""
    resume: bool = True
    """Continue from out_dir's latest checkpoint when there is one."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError("checkpoint.every must be >= 1")
        if self.every_s < 0:
            raise ConfigError("checkpoint.every_s must be >= 0 (0: save by steps only)")
        if self.keep < 0:
            raise ConfigError("checkpoint.keep must be >= 0 (0 keeps every checkpoint)")


@dataclass(kw_only=True)
class FinetuneConfig:
    init_from: str | None = None
    """Start this new run (new optimizer and schedule) from the weights of a pretrained run
    folder, checkpoint folder or consolidated folder, saved under any parallel layout. The
    trunk's config must match; heads are matched by name (see init_heads) and the
    pretrained neighbour normaliser and head scales are kept."""
    init_heads: list[str] = field(default_factory=list)
    """With init_from, 'new=old' starts head new from pretrained head old, 'new=' starts it
    fresh; a head not listed starts from the pretrained head of its name, else fresh."""
    freeze: list[str] = field(default_factory=list)
    """Glob patterns of parameter names that do not train (e.g. 'backbone.embedding.*',
    'backbone.blocks.0.*'); each must match a parameter."""

    def __post_init__(self) -> None:
        for entry in self.init_heads:
            if "=" not in entry or not entry.partition("=")[0]:
                raise ConfigError(f"finetune.init_heads: {entry!r}; write 'new=old' or 'new='")
        if self.init_heads and self.init_from is None:
            raise ConfigError("finetune.init_heads needs finetune.init_from")


@dataclass(kw_only=True)
class KernelConfig:
    backend: str = "auto"
    """'auto' (fused Triton kernels on CUDA), 'triton' (always) or 'torch' (the references)."""
    dot: str = "ieee"
    """How the fused kernels' filter MLP multiplies fp32 values: 'ieee' (exact, default),
    'tf32' or 'bf16' (tensor cores, fp32 accumulation; about 1e-3 and 1e-2 relative
    error). fp64 runs always multiply in fp64."""
    autotune: bool = False
    """On a GPU, time every launch configuration of each kernel (kernels/tuning.py) at the
    first launch of each shape class and keep the fastest; off: each kernel's default."""

    def __post_init__(self) -> None:
        if self.dot not in ("ieee", "tf32", "bf16"):
            raise ConfigError(f"kernels.dot={self.dot!r}: use 'ieee', 'tf32' or 'bf16'")
        if self.backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"kernels.backend={self.backend!r}: use 'auto', 'triton' or 'torch'")


def parse_duration(text: str | float) -> float:
    """Seconds from '5400', '5400.5', '90:00' (MM:SS) or '1:30:00' (HH:MM:SS)."""
    parts = str(text).strip().split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or len(values) > 3 or any(v < 0 for v in values):
        raise ConfigError(f"train.time_budget={text!r}: give seconds or HH:MM:SS")
    seconds = 0.0
    for v in values:
        seconds = seconds * 60 + v
    return seconds


@dataclass(kw_only=True)
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size: the channels of every block are split over this many ranks."""
    pipeline: int = 1
    """Pipeline-parallel size: consecutive blocks form this many stages."""
    node_parallel: bool = False
    """Node-parallel regions: with tensor > 1, the atoms between blocks and in per-node MLPs
    are split over the tensor-parallel ranks too (Megatron's sequence parallelism)."""
    data_parallel: str = "auto"
    """How data-parallel ranks share gradients and optimizer state: 'megatron' (megatron-core
    DDP, each gradient bucket reduced as soon as the backward pass fills it, and its
    DistributedOptimizer), 'flat' (one all-reduce after the backward, torch's ZeRO-1) or
    'auto' (megatron on CUDA with parallel.shard_optimizer and fp32/bf16, flat otherwise)."""
    shard_optimizer: bool = True
    """With data parallelism, keep each AdamW moment on one data-parallel rank (ZeRO-1)."""
    overlap_grad_reduce: bool = True
    """megatron: reduce buckets during the backward pass. This needs a gradient for every
    trainable parameter in every step; turn it off for a model where some get none."""
    bucket_size: int | None = None
    """megatron: gradient elements per bucket (None: megatron's default, 4e7 or more)."""

    def __post_init__(self) -> None:
        if self.tensor < 1 or self.pipeline < 1:
            raise ConfigError("parallel.tensor and parallel.pipeline must be >= 1")
        if self.data_parallel not in ("auto", "megatron", "flat"):
            raise ConfigError(
                f"parallel.data_parallel={self.data_parallel!r}: use auto, megatron or flat"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel size: what is left of the world after tensor x pipeline."""
        per_replica = self.tensor * self.pipeline
        if world_size % per_replica:
            raise ConfigError(
                f"{world_size} processes cannot hold whole replicas of parallel.tensor="
                f"{self.tensor} x parallel.pipeline={self.pipeline}; launch a multiple of "
                f"{per_replica} processes"
            )
        return world_size // per_replica
