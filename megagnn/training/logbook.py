"""What a run reports while it trains, on the main rank only: the progress bar, TensorBoard
scalars, metrics.jsonl and the resolved config.yaml."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from tqdm import tqdm

from megagnn.config import Config, config_to_dict
from megagnn.training import records


class Logbook:
    """Open for the length of ``Trainer.train``; every method is a no-op off the main rank."""

    def __init__(
        self, cfg: Config, out_dir: Path, main: bool, step: int, total: int | None, atoms: int
    ):
        self.out_dir, self.main, self.writer = out_dir, main, None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
            # purge_step: a resumed run's TensorBoard curve drops what came after the checkpoint
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=step or None)
        unit = "step" if total is not None else "%"
        self.bar = tqdm(
            total=total if total is not None else 100,
            initial=step if total is not None else 0,
            desc="train",
            unit=unit,
            disable=not (cfg.train.progress and main),
            bar_format=None
            if total is not None
            else "{l_bar}{bar}| {n:.0f}/100 % of the time budget [{elapsed}<{remaining}{postfix}]",
        )
        self.timed = total is None
        self.atoms, self.since = atoms, time.perf_counter()  # the run's atoms at the last write

    def __enter__(self) -> Logbook:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def progress(self, step: int, share: float | None, loss: float) -> None:
        """The bar at ``step`` (or, under a time budget, at ``share`` of it)."""
        if self.timed:
            self.bar.update(100 * (share or 0.0) - self.bar.n)
        else:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{loss:.4g}")

    def train_scalars(self, step: int, metrics: dict[str, float], atoms: int) -> None:
        """The step's metrics, with the atoms per second since the last write (``atoms``:
        the run's atoms so far, all replicas)."""
        now = time.perf_counter()
        metrics["throughput/atoms_per_s"] = (atoms - self.atoms) / (now - self.since)
        self.atoms, self.since = atoms, now
        self._write(step, metrics)

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        self._write(step, {f"val/{k}": v for k, v in metrics.items()})
        if self.main:
            shown = (f"{k} {v:.4g}" for k, v in metrics.items() if not k.startswith("baseline"))
            self.bar.write(f"step {step}: " + ", ".join(shown))

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        records.append_metrics(self.out_dir, step, metrics)
