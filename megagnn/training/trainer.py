"""Training: model, optimizer, loop, validation, checkpoints (data: sources.py)."""

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
import yaml
from tqdm import tqdm

from megagnn import keys as K
from megagnn import ops
from megagnn.checkpoint import sharded as checkpoint
from megagnn.checkpoint.sharded import rng_state
from megagnn.config import Config, config_to_dict
from megagnn.data.graph import to_device
from megagnn.data.sampler import (
    iterate_batches,
)
from megagnn.data.shards import atomic_write_json
from megagnn.models import count_parameters
from megagnn.parallel.pipeline import forward_backward as pipeline_forward_backward
from megagnn.parallel.state import ParallelState, default_device
from megagnn.precision import DTYPES
from megagnn.training import budget, records
from megagnn.training.build import build_rank_model, build_rank_optimizer, freeze, size_warning
from megagnn.training.ema import WeightAverage, averaged
from megagnn.training.evaluation import evaluate
from megagnn.training.finetune import Pretrained, describe
from megagnn.training.host_memory import keep_freed_memory
from megagnn.training.loss import loss_terms
from megagnn.training.schedule import warmup_cosine
from megagnn.training.sources import DataSplits, data_sources, set_model_statistics
from megagnn.training.stopping import StopSignals, TimeBudget, agree


class Trainer:
    """Reads top to bottom: build everything in __init__, then ``train()`` loops over steps.

    Under torchrun, ``parallel`` says where this process sits: the model is cut over the
    tensor-parallel group and every data-parallel replica reads its own batches.
    """

    def __init__(self, cfg: Config, parallel: ParallelState | None = None):
        self.cfg = cfg
        self.par = parallel or ParallelState(device=default_device())
        self.device = self.par.device
        if self.device.type == "cpu":
            keep_freed_memory()  # the step's activations reuse the heap (see host_memory)
        self.dtype = DTYPES[cfg.train.precision]
        self.out_dir = Path(cfg.train.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if cfg.train.kernels == "triton" and self.device.type != "cuda" and not interpreted:
            raise ValueError(
                "train.kernels=triton without CUDA needs TRITON_INTERPRET=1 in the "
                "environment (the interpreter: slow, for tests); use 'auto' or 'torch'"
            )
        if (text := size_warning(cfg)) is not None and self.par.is_main:
            warnings.warn(text, stacklevel=2)
        ops.set_backend(cfg.train.kernels)
        ops.set_deterministic(cfg.train.deterministic)
        ops.set_dot_precision(cfg.train.kernel_dot)
        ops.set_autotune(cfg.train.kernel_autotune and self.device.type == "cuda")
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
            torch.use_deterministic_algorithms(True)
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
        found = checkpoint.latest_checkpoint(self.ckpt_dir) if cfg.train.resume else None
        if found is not None:  # said first: a reused out_dir must not resume unnoticed
            self.log(
                f"resuming {found} (train.resume=true and {self.out_dir} holds a checkpoint; "
                "use another train.out_dir or train.resume=false to start over)"
            )
        saved = checkpoint.read_common(found) if found is not None else None
        if saved is not None:
            records.check_resumable(cfg, saved, found, self.sources, self.out_dir)
        pretrained = None  # a resumed fine-tuning run continues from its own checkpoint
        if cfg.train.init_from is not None and found is None:
            pretrained = Pretrained(cfg.train.init_from, self.device)
            pretrained.check(cfg.model)
        self.statistics = records.training_statistics(self.sources, self.par, saved)
        if pretrained is not None:
            self.statistics = pretrained.adapt_statistics(self.statistics, cfg)
        self.potential, self.pipeline = build_rank_model(cfg, self.par, self.dtype)
        set_model_statistics(self.potential, self.statistics)
        self.model = (self.pipeline or self.potential).to(self.device, self.dtype)
        if pretrained is not None:
            fresh = pretrained.load_into(self.model, self.par, cfg)
        frozen = freeze(cfg, self.model)
        if pretrained is not None:
            self.log(describe(pretrained, cfg, fresh, frozen))
        # gradient reduction and AdamW, as parallel.data_parallel picks (megagnn.parallel.data)
        self.optimizer = build_rank_optimizer(cfg, self.model, self.par, self.dtype)
        self.average = (
            WeightAverage(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        )
        saved = saved or {}
        self.compute = budget.Compute.from_state(saved.get("compute"))
        self.early = budget.EarlyStopping(
            cfg.train.patience,
            **{k: v for k, v in saved.get("early", {}).items() if k != "patience"},
        )
        if cfg.train.flops_budget is not None and self.compute.flops_per_atom is None:
            self._measure_flops()  # the schedule's length depends on it
        self.max_steps = cfg.train.max_steps
        if cfg.train.epochs is not None or cfg.train.flops_budget is not None:
            self.max_steps = budget.planned_steps(
                cfg.train, self._epoch_batch_atoms(), self.par.dp_size, self.compute.flops_per_atom
            )
        budget_s = cfg.train.time_budget_s
        self.clock = TimeBudget(budget_s) if budget_s is not None else None
        progress = None
        if self.clock is not None:  # the schedule follows the wall clock, not a step count
            self.max_steps = 2**62
            progress = lambda: self.clock.progress(self.compute.wall_s)  # noqa: E731
        self.scheduler = warmup_cosine(
            self.optimizer.optimizer, cfg.train, self.max_steps, progress
        )
        self._saved_clock = time.perf_counter()
        self.step = 0
        self.bad_steps = 0
        if self.par.is_main:
            records.record_run(self.out_dir, self.sources, self.statistics)

        if found is not None:
            self.resume(found)
            self.log(f"resumed from {found} at step {self.step}")

    def log(self, text: str) -> None:
        if self.par.is_main:
            print(text)

    # -- state ---------------------------------------------------------------------------
    def common_state(self) -> dict:
        """Everything but the weights and moments: small, the same on every rank."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data": {
                "sources": [
                    {"epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch} for s in self.sources
                ]
            },
            "rng": rng_state(),  # rank 0's; training draws no random numbers after init
            "statistics": self.statistics,
            "compute": self.compute.state_dict(),
            "early": self.early.state_dict(),
            "config": config_to_dict(self.cfg),
            "ema": self.average.state_dict() if self.average else None,
            "clock": self.clock.longest if self.clock else None,
        }

    def _epoch_batch_atoms(self) -> list[int]:
        """Atoms of every training batch of this rank's first epoch, every dataset's."""
        return [int(s.data.n_atoms[b].sum()) for s in self.sources for b in s.sampler.batches(0)]

    def _measure_flops(self, micro: list[dict] | None = None) -> dict | None:
        """FLOPs per atom of the job, from a FlopCounterMode count of one step on every rank
        (collective). ``micro``: count this real training step and return its metrics;
        without it, count a forward and backward on the first batch and change nothing."""
        if micro is None:
            source = self.sources[0]
            first = next(iter(iterate_batches(source.data.graphs, source.sampler, 0)))
            batches = [to_device(first, self.device, self.dtype)] * self.cfg.train.microbatches
            self.model.train()
            _, flops = budget.count_flops(lambda: self.forward_backward(batches))
            self.optimizer.zero_grad()
            metrics = None
        else:
            batches = micro
            metrics, flops = budget.count_flops(lambda: self.train_step(micro))
        atoms = sum(int(b[K.N_ATOMS].sum()) for b in batches)
        self.compute.flops_per_atom = budget.flops_per_atom(flops, atoms, self.par, self.device)
        return metrics

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint of the same model and data saved under any parallel
        layout (a different data-parallel size resumes the data order approximately)."""
        shadow = self.average.shadow if self.average else None
        common = checkpoint.load(path, self.model, self.optimizer, self.par, shadow)
        if self.average is not None and common.get("ema"):
            self.average.load_state_dict(common["ema"])
        if self.clock is not None and common.get("clock"):  # durations seen before
            self.clock.longest.update(common["clock"])
        self.scheduler.load_state_dict(common["scheduler"])
        self.step = common["step"]
        positions = common["data"].get("sources", [common["data"]])  # older: one dataset
        if len(positions) != len(self.sources):
            raise ValueError(
                f"{path} was saved with {len(positions)} datasets, this run has "
                f"{len(self.sources)}; use another train.out_dir or train.resume=false"
            )
        for source, position in zip(self.sources, positions, strict=True):
            source.epoch, source.batch_in_epoch = position["epoch"], position["batch_in_epoch"]
        checkpoint.set_rng_state(common["rng"])
        if self.par.is_main:
            records.trim_metrics(self.out_dir, self.step)

    def save(self, best: bool = False) -> None:
        """Collective sharded save; ``latest`` (and with ``best``, ``best``) moves only once
        every rank has written. The run's compute so far goes to compute.json."""
        started = time.perf_counter()
        checkpoint.save(
            self.ckpt_dir,
            self.step,
            self.model,
            self.optimizer,
            self.common_state(),
            self.par,
            keep=self.cfg.train.keep_checkpoints,
            best=best,
            average=self.average.shadow if self.average else None,
        )
        if self.par.is_main:
            state = {**self.compute.state_dict(), "step": self.step, "max_steps": self.max_steps}
            state["best"] = self.early.state_dict() if self.cfg.train.patience else None
            atomic_write_json(self.out_dir / records.COMPUTE, state)
        self._saved_clock = time.perf_counter()
        if self.clock is not None:
            self.clock.record("save", self._saved_clock - started)

    # -- loop ----------------------------------------------------------------------------
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

    def forward_backward(self, batches: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Loss and gradients of the mean loss over ``batches`` (microbatches), accumulated in
        the parameters' grads. Returns each microbatch's loss terms where the loss lives."""
        cfg = self.cfg.train

        def loss_fn(batch, pred):
            terms = loss_terms(pred, batch, self.potential.scale, cfg)
            # copies: megatron's schedule divides the returned loss in place
            return terms["total"], {k: v.detach().clone() for k, v in terms.items()}

        if self.pipeline is not None:
            return pipeline_forward_backward(
                self.pipeline, batches, loss_fn, autocast=self.autocast
            )
        out = []
        for i, batch in enumerate(batches):
            with self.autocast():
                pred = self.model(batch)
            loss, terms = loss_fn(batch, pred)
            with self.optimizer.no_sync(last=i == len(batches) - 1):
                (loss / len(batches)).backward()
            out.append(terms)
        return out

    def train_step(self, batches: list[dict]) -> dict[str, float] | None:
        """One optimizer step over ``batches``; returns None (and changes nothing) if the loss
        or the gradient was not finite on any rank."""
        cfg = self.cfg.train
        self.model.train()
        batches = [to_device(b, self.device, self.dtype) for b in batches]
        self.optimizer.zero_grad()
        terms = self.forward_backward(batches)
        if not all(torch.isfinite(t["total"]) for t in terms):
            # poison the gradient so that every rank sees a non-finite global norm below
            self.optimizer.poison()
        self.optimizer.reduce()  # the data-parallel mean gradient
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        # the norm is summed over tensor and pipeline ranks: all ranks decide alike
        grad_norm = self.optimizer.clip(max_norm)
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

    def train(self) -> dict[str, float]:
        cfg = self.cfg.train
        main = self.par.is_main
        writer = None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg)))
            # purge_step: a resumed run's TensorBoard curve drops what came after the checkpoint
            writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)
        self.log(
            f"model: {self.cfg.model.family} H={self.cfg.model.hidden} "
            f"L={self.cfg.model.layers}, {count_parameters(self.model):,} parameters per rank; "
            f"tensor={self.par.tp_size} pipeline={self.par.pp_size} data={self.par.dp_size}; "
            + "; ".join(
                f"{s.name}: train/val/test = {[len(v) for v in s.data.indices.values()]} "
                f"structures, weight {s.weight:g}"
                for s in self.sources
            )
        )
        bar = tqdm(
            total=self.max_steps if self.clock is None else None,
            initial=self.step,
            desc="train",
            disable=not (cfg.progress and main),
        )
        t0, atoms_seen, last = time.perf_counter(), 0, {}
        saved_at, tick = self.step, time.perf_counter()
        signals, clock = StopSignals(), self.clock
        with signals.caught():
            while self.step < self.max_steps:
                now = time.perf_counter()  # wall time of everything: steps, validation, saves
                self.compute.wall_s, tick = self.compute.wall_s + now - tick, now
                time_up = clock is not None and clock.next_is_last(self.compute.wall_s)
                stop, time_up = agree(
                    [signals.received or 0, time_up], self.device, self.par.world_size
                )
                if stop:
                    if saved_at != self.step:
                        self.save()
                    self.log(
                        f"stopped by {signal.Signals(stop).name} at step "
                        f"{self.step}; checkpoint saved, rerun the same command to resume"
                    )
                    break
                micro = self.next_batches()
                started = time.perf_counter()
                if self.compute.flops_per_atom is None:  # the first step is counted
                    metrics = self._measure_flops(micro)
                else:
                    metrics = self.train_step(micro)
                if clock is not None and self.step:  # the first, FLOP-counted step is slow
                    clock.record("step", time.perf_counter() - started)
                self.scheduler.step()
                self.step += 1
                # all replicas, about: each replica's batches have about as many atoms
                atoms = sum(int(b[K.N_ATOMS].sum()) for b in micro) * self.par.dp_size
                atoms_seen += atoms
                self.compute.add(atoms)
                if metrics is None:
                    self._skipped_step()
                    continue
                self.bad_steps = 0
                last = metrics
                final = self.step == self.max_steps or bool(time_up)
                bar.update(self.step - bar.n)
                bar.set_postfix(loss=f"{metrics['loss/total']:.4g}")
                if writer and (self.step % cfg.log_every == 0 or final):
                    metrics["lr"] = self.scheduler.get_last_lr()[0]
                    metrics["throughput/atoms_per_s"] = atoms_seen / (time.perf_counter() - t0)
                    metrics["compute/flops"] = self.compute.flops
                    metrics["compute/wall_s"] = self.compute.wall_s
                    for k, v in metrics.items():
                        writer.add_scalar(k, v, self.step)
                    self._append_metrics(metrics)
                    t0, atoms_seen = time.perf_counter(), 0
                improved = False
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or final):
                    started = time.perf_counter()
                    val = self._validate_and_log(writer, bar)
                    if clock is not None:
                        clock.record("validate", time.perf_counter() - started)
                    if val is not None and "loss" in val and cfg.patience:
                        improved = self.early.update(val["loss"], self.step)
                since_save = time.perf_counter() - self._saved_clock
                if (
                    improved
                    or self.early.stop
                    or self.step % cfg.save_every == 0
                    or final
                    or 0 < cfg.save_every_s <= since_save
                ):
                    self.save(best=improved)
                    saved_at = self.step
                if time_up:
                    left = clock.seconds - self.compute.wall_s - (time.perf_counter() - tick)
                    self.log(
                        f"time budget: stopped at step {self.step} with {left:.0f} s of "
                        f"{clock.seconds:.0f} s left; checkpoint saved"
                    )
                    break
                if self.early.stop:
                    self.log(
                        f"early stop at step {self.step}: the validation loss has not improved "
                        f"for {cfg.patience} validations since step {self.early.best_step} "
                        f"({self.early.best_loss:.4g}); checkpoints/best holds that step"
                    )
                    break
        bar.close()
        if writer:
            writer.close()
        return last

    def _skipped_step(self) -> None:
        self.bad_steps += 1
        if self.par.is_main:
            warnings.warn(
                f"step {self.step}: non-finite loss or gradient, step skipped", stacklevel=2
            )
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_steps} consecutive non-finite steps; lower train.lr or check the data"
            )

    def _validate_and_log(self, writer, bar) -> dict[str, float] | None:
        if not any(len(s.data.indices["val"]) for s in self.sources):
            return None
        with averaged(self.model, self.average):  # the weights that will be served
            val = self.validate()  # every rank takes part (tensor parallel needs it)
        if writer:
            for k, v in val.items():
                writer.add_scalar(f"val/{k}", v, self.step)
            self._append_metrics({f"val/{k}": v for k, v in val.items()})
            bar.write(f"step {self.step}: " + _format(val))
        return val

    def _append_metrics(self, metrics: dict[str, float]) -> None:
        records.append_metrics(self.out_dir, self.step, metrics)

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
                source.data.sampler("val", shuffle=False, limit=self.cfg.train.eval_structures),
                self.device,
                self.dtype,
                predict=self.predict,
                loss_cfg=self.cfg.train,
                group=self.par.dp_group,
            )
            prefix = f"{source.name}/" if len(self.sources) > 1 else ""
            metrics.update({prefix + k: v for k, v in result.items()})
            losses += [result["loss"]] if "loss" in result else []
        if len(self.sources) > 1 and losses:
            metrics["loss"] = sum(losses) / len(losses)
        return self.from_last_stage(metrics)


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.startswith("baseline"))


__all__ = ["DataSplits", "Trainer", "evaluate"]
