"""The consolidated format: one folder holding ``model.safetensors`` (every weight and
buffer under its global name and whole shape, the averaged weights where the run kept an
average) and ``config.json`` (the run's config, step, statistics and source).

The weights file is written by streaming one tensor at a time into a temporary file that
is renamed when complete, so memory stays at about the largest single tensor and a crash
leaves no file that looks whole.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from megagnn.checkpoint.errors import CheckpointError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
}


def is_consolidated(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def write_weights(
    path: Path,
    entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    read: Callable[[str], torch.Tensor],
    metadata: dict[str, str],
    progress: Callable[[list], Iterable] = iter,
) -> None:
    """Stream a safetensors file: ``entries`` (name, shape, dtype) fix the header, then
    ``read(name)`` gives each tensor in turn. Written to ``path.tmp``, renamed at the end."""
    entries = list(entries)
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **metadata}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, _, _ in progress(entries):
                tensor = read(name).contiguous()
                # the tensor's own bytes, not a copy (tobytes would double the peak)
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                del tensor
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing half-written stays behind


def write_config(folder: Path, info: dict[str, Any]) -> None:
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, folder / CONFIG)


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a consolidated folder: config, step, statistics, weights, source."""
    path = Path(folder) / CONFIG
    try:
        info = json.loads(path.read_text())
        info["config"], info["step"]  # noqa: B018 (what every reader needs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    return info


def check_weights(folder: str | Path) -> None:
    """Raise CheckpointError if ``model.safetensors`` is cut short or its header is not a
    safetensors header (reads the header and the file size only)."""
    path = Path(folder) / WEIGHTS
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length:,} bytes in a {size:,}-byte file")
            header = json.loads(f.read(length))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: corrupt ({type(e).__name__}: {e})") from e
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path}: truncated ({size:,} of {8 + length + end:,} bytes); the file is corrupt"
        )


def open_weights(folder: str | Path):
    """A safetensors reader of the folder's weights (a context manager), checked first."""
    from safetensors import safe_open

    check_weights(folder)
    return safe_open(str(Path(folder) / WEIGHTS), "pt")


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's ``model.safetensors``."""
    from safetensors.torch import load_file

    check_weights(folder)
    return load_file(str(Path(folder) / WEIGHTS))
