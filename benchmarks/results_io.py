"""How benchmark scripts write their results: OUT.json (metadata and the data) and OUT.md
(the metadata as a list, then the script's table), with date, device and command."""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path


def write_results(
    out: str | Path, script: str, argv: list[str] | None, device: str, data: dict, text: str, **meta
) -> Path:
    """Write ``data`` and ``text`` under the stem ``out``; ``script`` is the caller's
    ``__file__``, ``argv`` its arguments (default: the command line's)."""
    meta = {
        "date": date.today().isoformat(),
        "command": " ".join([f"benchmarks/{Path(script).name}", *(argv or sys.argv[1:])]),
        "device": device,
        **meta,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, **data}, indent=1))
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    out.with_suffix(".md").write_text(f"{header}\n\n{text}\n")
    return out
