"""Where the benchmarks in `bench/` write their JSON: `bench/results/` under the project root.

The project root is `pipeline.engine.config.project_root()` ($KP_ROOT, else the folder holding
`configs/`), so a benchmark run on a throwaway project (the benches' smoke test) writes there and
never over a real result.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(name: str, result: Any) -> Path:
    """Write `result` as `bench/results/NAME` (indented JSON) and say where.

    Args:
        name: the file name, e.g. `score_dogscats_random.json`.
        result: JSON values.

    Returns:
        The file written.
    """
    from pipeline.engine.config import project_root

    out = project_root() / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out
