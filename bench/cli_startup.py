"""How long `kp --help` and `kp status` take to start, next to `import tensorflow` for scale.

Each command runs in a fresh process, several times, interleaved; the table shows the median and
the fastest. Writes bench/results/cli_startup.json. No thresholds here: read the numbers.
    .venv/bin/python bench/cli_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "kp --help": [sys.executable, "-m", "pipeline", "--help"],
    "kp status --comp digits": [sys.executable, "-m", "pipeline", "status", "--comp", "digits"],
    "python -c pass": [sys.executable, "-c", "pass"],
    "import tensorflow": [sys.executable, "-c", "import tensorflow"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, cwd=REPO, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    rows = [{"command": name, "median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
             "runs": len(t)} for name, t in times.items()]
    print(f"{'command':28} {'median s':>9} {'min s':>7}")
    for row in rows:
        print(f"{row['command']:28} {row['median_s']:9.3f} {row['min_s']:7.3f}")
    out = REPO / "bench" / "results" / "cli_startup.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": sys.version.split()[0], "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
