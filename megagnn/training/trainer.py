"""Training: ``Trainer`` builds a rank's part of everything, then ``train()`` steps and acts
on the decisions of ``policies``. Saving and resuming live in ``run_state``, reporting in
``logbook``, the model and optimizer in ``build``, the data in ``sources``."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

from megagnn import keys as K
from megagnn import ops
from megagnn.checkpoint import sharded
from megagnn.config import Config
from megagnn.data.graph import to_device
from megagnn.data.sampler import iterate_batches
from megagnn.models.compiled import CompiledForward
from megagnn.parallel.pipeline import forward_backward as pipeline_forward_backward
from megagnn.parallel.state import ParallelState, default_device
from megagnn.precision import DTYPES
from megagnn.training import budget, lock, policies, records, run_state
from megagnn.training.build import (
    ModelSpec,
    build_rank_model,
    build_rank_optimizer,
    freeze,
    size_warning,
)
from megagnn.training.ema import WeightAverage, averaged
from megagnn.training.evaluation import evaluate
from megagnn.training.finetune import Pretrained, describe
from megagnn.training.host_memory import keep_freed_memory
from megagnn.training.logbook import Logbook
from megagnn.training.loss import loss_terms
from megagnn.training.schedule import warmup_cosine
from megagnn.training.sources import (
    DataSplits,
    data_sources,
    label_plan,
    set_model_statistics,
)
from megagnn.training.stopping import StopSignals, TimeBudget, agree


def configure_kernels(cfg: Config, device: torch.device) -> None:
    """The process-wide kernel switches of ``megagnn.ops`` from kernels.* and determinism."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if cfg.kernels.backend == "triton" and device.type != "cuda" and not interpreted:
        raise ValueError(
            "kernels.backend=triton without CUDA needs TRITON_INTERPRET=1 in the "
            "environment (the interpreter: slow, for tests); use 'auto' or 'torch'"
        )
    ops.set_backend(cfg.kernels.backend)
    ops.set_deterministic(cfg.train.deterministic)
    ops.set_dot_precision(cfg.kernels.dot)
    ops.set_autotune(cfg.kernels.autotune and device.type == "cuda")
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
        torch.use_deterministic_algorithms(True)


class Trainer:
    """Under torchrun, ``parallel`` says where this process sits: the model is cut over the
    tensor-parallel group and every data-parallel replica reads its own batches."""

    def __init__(self, cfg: Config, parallel: ParallelState | None = None):
        self.cfg = cfg
        self.par = parallel or ParallelState(device=default_device())
        self.device = self.par.device
        self.dtype = DTYPES[cfg.train.precision]
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.par.is_main and (note := lock.acquire(self.out_dir)) is not None:
            self.log(f"{self.out_dir}: {note}")
        if self.device.type == "cpu":
            keep_freed_memory()  # the step's activations reuse the heap (see host_memory)
        spec = ModelSpec.of(cfg.model)  # the one whole-model build: names, size, μP scales
        if (text := size_warning(cfg, spec)) is not None and self.par.is_main:
            warnings.warn(text, stacklevel=2)
        configure_kernels(cfg, self.device)
        self.autocast = (
            partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
            if cfg.train.precision == "bf16"
            else contextlib.nullcontext
        )
        torch.manual_seed(cfg.train.seed)
        # every pipeline stage of a replica reads the same batches (same data-parallel rank)
        self.sources = data_sources(cfg, self.par.dp_rank, self.par.dp_size)
        self.data = self.sources[0].data
        self._streams = None
        found = sharded.latest_checkpoint(self.ckpt_dir) if cfg.checkpoint.resume else None
        if found is not None:  # said first: a reused out_dir must not resume unnoticed
            self.log(
                f"resuming {found} (checkpoint.resume=true and {self.out_dir} holds a "
                "checkpoint; use another train.out_dir or checkpoint.resume=false to start over)"
            )
        saved = sharded.read_common(found) if found is not None else None
        if saved is not None:
            records.check_resumable(cfg, saved, found)
        records.check_recorded_split(self.sources, self.out_dir)
        pretrained = None  # a resumed fine-tuning run continues from its own checkpoint
        if cfg.finetune.init_from is not None and found is None:
            pretrained = Pretrained(cfg.finetune.init_from, self.device)
            pretrained.check(cfg.model)
        self.statistics = records.training_statistics(self.sources, self.par, saved)
        if pretrained is not None:
            self.statistics = pretrained.adapt_statistics(self.statistics, cfg)
        self.potential, self.pipeline = build_rank_model(cfg, self.par, self.dtype, spec)
        set_model_statistics(self.potential, self.statistics)
        forces, stress, notes = label_plan(cfg, self.sources)
        self.potential.labels_forces, self.potential.labels_stress = forces, stress
        for note in notes:
            self.log(note)
        self.model = (self.pipeline or self.potential).to(self.device, self.dtype)
        # the training forward: the module, or one compiled graph of its outputs
        self.forward = (
            CompiledForward(self.potential, log=self.log) if cfg.train.compile else self.model
        )
        if pretrained is not None:
            fresh = pretrained.load_into(self.model, self.par, cfg)
        frozen = freeze(cfg, self.model, spec)
        if pretrained is not None:
            self.log(describe(pretrained, cfg, fresh, frozen))
        self.parameters = spec.parameters
        # gradient reduction and AdamW, as parallel.data_parallel picks (megagnn.parallel.data)
        self.optimizer = build_rank_optimizer(cfg, self.model, self.par, spec, self.dtype)
        decay = cfg.optim.ema_decay
        self.average = WeightAverage(self.model, decay) if decay else None
        saved = saved or {}
        self.compute = budget.Compute.from_state(saved.get("compute"))
        self.early = budget.EarlyStopping(
            cfg.validate.patience,
            **{k: v for k, v in saved.get("early", {}).items() if k != "patience"},
        )
        self._plan_schedule()
        self.step = self.saved_at = 0
        self.saved_clock = time.perf_counter()
        self.bad_steps = 0
        if self.par.is_main:
            records.record_run(self.out_dir, self.sources, self.statistics)
        if found is not None:
            run_state.resume(self, found)
            self.log(f"resumed from {found} at step {self.step}")

    def _plan_schedule(self) -> None:
        """The run's length (steps, epochs, FLOPs or wall clock) and its learning rates."""
        cfg = self.cfg.train
        if cfg.flops_budget is not None and self.compute.flops_per_atom is None:
            self._measure_flops()  # the schedule's length depends on it
        self.max_steps = cfg.max_steps
        if cfg.epochs is not None or cfg.flops_budget is not None:
            self.max_steps = budget.planned_steps(
                cfg, self._epoch_batch_atoms(), self.par.dp_size, self.compute.flops_per_atom
            )
        self.clock = TimeBudget(cfg.time_budget_s) if cfg.time_budget_s is not None else None
        progress = None
        if self.clock is not None:  # the schedule follows the wall clock, not a step count
            self.max_steps = 2**62
            progress = lambda: self.clock.progress(self.compute.wall_s)  # noqa: E731
        self.scheduler = warmup_cosine(
            self.optimizer.optimizer, self.cfg.optim, self.max_steps, progress
        )

    def log(self, text: str) -> None:
        if self.par.is_main:
            print(text)

    def save(self, best: bool = False) -> None:
        """Collective: save a checkpoint now (``run_state.save``)."""
        run_state.save(self, best)

    def common_state(self) -> dict:
        return run_state.common_state(self)

    # -- the loop ------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Step until a stop rule fires; returns the last step's training metrics."""
        self.log(self._banner())
        total = None if self.clock is not None else self.max_steps
        last, tick, signals = {}, time.perf_counter(), StopSignals()
        logbook = Logbook(
            self.cfg, self.out_dir, self.par.is_main, self.step, total, self.compute.atoms
        )
        with signals.caught(), logbook, self._holding_lock():
            while self.step < self.max_steps:
                now = time.perf_counter()  # wall time of everything: steps, validation, saves
                self.compute.wall_s, tick = self.compute.wall_s + now - tick, now
                time_up = self._time_up()
                # ranks see signals and clocks at different moments: all decide alike
                received, time_up = agree(
                    [signals.received or 0, time_up], self.device, self.par.world_size
                )
                if received:
                    self._stop(policies.Stop.SIGNAL, received)
                    break
                micro = self.next_batches()
                metrics = self.timed_step(micro)
                if metrics is None:
                    self._skipped_step()
                    continue
                self.bad_steps, last = 0, metrics
                plan = policies.after_step(self.cfg, self.step, self.max_steps, bool(time_up))
                share = self.clock.progress(self.compute.wall_s) if self.clock else None
                logbook.progress(self.step, share, metrics["loss/total"])
                if plan.log:  # the returned metrics carry these too
                    metrics.update(self._counters())
                    logbook.train_scalars(self.step, metrics, self.compute.atoms)
                improved = plan.validate and self._validate(logbook)
                since_save = time.perf_counter() - self.saved_clock
                if policies.save_now(
                    self.cfg, self.step, plan.final, improved, self.early.stop, since_save
                ):
                    run_state.save(self, best=improved)
                reason = policies.stop_after_step(
                    self.step, self.max_steps, bool(time_up), self.early.stop
                )
                if reason is not None:
                    self._stop(reason, tick=tick)
                    break
        return last

    @contextlib.contextmanager
    def _holding_lock(self):
        """The out_dir lock taken at construction is let go when training ends."""
        try:
            yield
        finally:
            if self.par.is_main:
                lock.release(self.out_dir)

    def _time_up(self) -> bool:
        """Whether the coming step is the last the time budget allows (counting the
        validation that step will run on its own schedule)."""
        if self.clock is None:
            return False
        every = self.cfg.validate.every
        validates = bool(every) and (self.step + 1) % every == 0
        return self.clock.next_is_last(self.compute.wall_s, validates)

    def _banner(self) -> str:
        data = "; ".join(
            f"{s.name}: train/val/test = {[len(v) for v in s.data.indices.values()]} "
            f"structures, weight {s.weight:g}"
            for s in self.sources
        )
        m, p = self.cfg.model, self.par
        return (
            f"model: {m.family} H={m.hidden} L={m.layers}, {self.parameters:,} parameters; "
            f"tensor={p.tp_size} pipeline={p.pp_size} data={p.dp_size}; {data}"
        )

    def _counters(self) -> dict[str, float]:
        return {
            "lr": self.scheduler.get_last_lr()[0],
            "compute/flops": self.compute.flops,
            "compute/wall_s": self.compute.wall_s,
        }

    def _stop(self, reason: policies.Stop, received: int = 0, tick: float = 0.0) -> None:
        """End the run: save what is not saved yet and say why."""
        if reason is policies.Stop.SIGNAL:
            if self.saved_at != self.step:
                run_state.save(self)
            self.log(
                f"stopped by {signal.Signals(received).name} at step {self.step}; checkpoint "
                "saved, rerun the same command to resume"
            )
        elif reason is policies.Stop.TIME:
            left = self.clock.seconds - self.compute.wall_s - (time.perf_counter() - tick)
            self.log(
                f"time budget: stopped at step {self.step} with {left:.0f} s of "
                f"{self.clock.seconds:.0f} s left; checkpoint saved"
            )
        elif reason is policies.Stop.EARLY:
            self.log(
                f"early stop at step {self.step}: the validation loss has not improved for "
                f"{self.cfg.validate.patience} validations since step {self.early.best_step} "
                f"({self.early.best_loss:.4g}); checkpoints/best holds that step"
            )

    def timed_step(self, micro: list[dict]) -> dict[str, float] | None:
        """One optimizer step and its bookkeeping: the first step of a run is FLOP-counted,
        the time budget learns the step's duration, the schedule and compute advance."""
        started = time.perf_counter()
        compiled = getattr(self.forward, "compile_s", 0.0)
        if self.compute.flops_per_atom is None:
            metrics = self._measure_flops(micro)
        else:
            metrics = self.train_step(micro)
        # a FLOP-counted or compiling step is no guide to the next ones
        compiling = getattr(self.forward, "compile_s", 0.0) != compiled
        if self.clock is not None and self.step and not compiling:
            self.clock.record("step", time.perf_counter() - started)
        self.scheduler.step()
        self.step += 1
        # all replicas, about: each replica's batches have about as many atoms
        self.compute.add(sum(int(b[K.N_ATOMS].sum()) for b in micro) * self.par.dp_size)
        return metrics

    def _validate(self, logbook: Logbook) -> bool:
        """Validate (every rank takes part), log; True if the loss is the best so far."""
        if not any(len(s.data.indices["val"]) for s in self.sources):
            return False
        started = time.perf_counter()
        with averaged(self.model, self.average):  # the weights that will be served
            val = self.validate()
        source = self.sources[0]  # passes over the (first) training split so far
        val["epoch"] = source.epoch + source.batch_in_epoch / len(source.sampler.batches(0))
        logbook.validation(self.step, val)
        if self.clock is not None:
            self.clock.record("validate", time.perf_counter() - started)
        if "loss" in val and self.cfg.validate.patience:
            return self.early.update(val["loss"], self.step)
        return False

    def _skipped_step(self) -> None:
        self.bad_steps += 1
        if self.par.is_main:
            warnings.warn(
                f"step {self.step}: non-finite loss or gradient, step skipped", stacklevel=2
            )
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_steps} consecutive non-finite steps; lower optim.lr or check the data"
            )

    # -- one step ------------------------------------------------------------------------
    def next_batches(self) -> list[dict]:
        """The step's microbatches. With several datasets each microbatch comes from one,
        drawn by weight from a generator seeded by (seed, step): every rank of a replica and
        a resumed run draw the same."""
        if self._streams is None:
            self._streams = [source.batches() for source in self.sources]
        n = self.cfg.train.microbatches
        if len(self.sources) == 1:
            return [next(self._streams[0]) for _ in range(n)]
        weights = np.array([s.weight for s in self.sources])
        rng = np.random.default_rng([self.cfg.train.seed, self.step])
        picks = rng.choice(len(self.sources), size=n, p=weights / weights.sum())
        return [next(self._streams[i]) for i in picks]

    def forward_backward(
        self, batches: list[dict], eager: bool = False
    ) -> list[dict[str, torch.Tensor]]:
        """Loss and gradients of the mean loss over ``batches`` (microbatches), accumulated in
        the parameters' grads. Returns each microbatch's loss terms where the loss lives.
        ``eager``: through the module even when training runs compiled."""

        def loss_fn(batch, pred):
            terms = loss_terms(pred, batch, self.potential.scale, self.cfg.loss)
            # copies: megatron's schedule divides the returned loss in place
            return terms["total"], {k: v.detach().clone() for k, v in terms.items()}

        if self.pipeline is not None:
            return pipeline_forward_backward(
                self.pipeline, batches, loss_fn, autocast=self.autocast
            )
        out, forward = [], self.model if eager else self.forward
        for i, batch in enumerate(batches):
            with self.autocast():
                pred = forward(batch)
            loss, terms = loss_fn(batch, pred)
            with self.optimizer.no_sync(last=i == len(batches) - 1):
                (loss / len(batches)).backward()
            out.append(terms)
        return out

    def train_step(self, batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step over ``batches``; returns None (and changes nothing) if the loss
        or the gradient was not finite on any rank."""
        self.model.train()
        batches = [to_device(b, self.device, self.dtype) for b in batches]
        self.optimizer.zero_grad()
        terms = self.forward_backward(batches)
        if not all(torch.isfinite(t["total"]) for t in terms):
            # poison the gradient so that every rank sees a non-finite global norm below
            self.optimizer.poison()
        self.optimizer.reduce()  # the data-parallel mean gradient
        clip = self.cfg.optim.grad_clip
        # the norm is summed over tensor and pipeline ranks: all ranks decide alike
        grad_norm = self.optimizer.clip(clip if clip > 0 else math.inf)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad()
            return None
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        out = None
        if terms:  # this rank holds the loss (the last pipeline stage, or every rank)
            out = {f"loss/{k}": float(sum(t[k] for t in terms)) / len(terms) for k in terms[0]}
            out["grad_norm"] = float(grad_norm)
        return self.from_last_stage(out)

    def _epoch_batch_atoms(self) -> list[int]:
        """Atoms of every training batch of this rank's first epoch, every dataset's."""
        return [int(s.data.n_atoms[b].sum()) for s in self.sources for b in s.sampler.batches(0)]

    def _measure_flops(self, micro: list[dict] | None = None) -> dict | None:
        """FLOPs per atom of the job, from a FlopCounterMode count of one step on every rank
        (collective). ``micro``: count this real training step and return its metrics;
        without it, count a forward and backward on the first batch and change nothing.
        A compiled forward runs code the counter cannot see: its model is counted eagerly."""
        if micro is not None and self.cfg.train.compile:
            self._measure_flops()
            return self.train_step(micro)
        if micro is None:
            source = self.sources[0]
            first = next(iter(iterate_batches(source.data.graphs, source.sampler, 0)))
            batches = [to_device(first, self.device, self.dtype)] * self.cfg.train.microbatches
            self.model.train()
            _, flops = budget.count_flops(lambda: self.forward_backward(batches, eager=True))
            self.optimizer.zero_grad()
            metrics = None
        else:
            batches = micro
            metrics, flops = budget.count_flops(lambda: self.train_step(micro))
        atoms = sum(int(b[K.N_ATOMS].sum()) for b in batches)
        self.compute.flops_per_atom = budget.flops_per_atom(flops, atoms, self.par, self.device)
        return metrics

    # -- predictions -----------------------------------------------------------------------
    def predict(self, batch: dict) -> dict | None:
        """Predictions for one batch (on the last pipeline stage; None on the others)."""
        if self.pipeline is None:
            return self.model(batch)

        def keep(batch, pred):
            return pred[K.ENERGY].new_zeros(()), {k: v.detach() for k, v in pred.items()}

        with torch.no_grad():
            out = pipeline_forward_backward(self.pipeline, [batch], keep, forward_only=True)
        return out[0] if out else None

    def from_last_stage(self, obj):
        """``obj`` as the pipeline's last stage has it, on every stage (logging happens on
        rank 0, the first stage)."""
        if self.par.pp_group is None:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(
            box, src=self.par.last_stage_rank(), group=self.par.pp_group
        )
        return box[0]

    def validate(self) -> dict[str, float]:
        """Validation errors and loss; with several datasets, per dataset as
        ``<head>/<metric>``, and ``loss`` their mean (what early stopping watches)."""
        metrics, losses = {}, []
        for source in self.sources:
            if not len(source.data.indices["val"]):
                continue
            result = evaluate(
                self.potential,
                source.data.graphs,  # graphs carry the source's head
                source.data.sampler("val", shuffle=False, limit=self.cfg.validate.structures),
                self.device,
                self.dtype,
                predict=self.predict,
                loss_cfg=self.cfg.loss,
                group=self.par.dp_group,
            )
            prefix = f"{source.name}/" if len(self.sources) > 1 else ""
            metrics.update({prefix + k: v for k, v in result.items()})
            losses += [result["loss"]] if "loss" in result else []
        if len(self.sources) > 1 and losses:
            metrics["loss"] = sum(losses) / len(losses)
        return self.from_last_stage(metrics)


__all__ = ["DataSplits", "Trainer", "evaluate"]
