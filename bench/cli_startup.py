"""How long `kp --help` and `kp status` take to start, next to `import tensorflow` for scale.

Each command runs in a fresh process, several times, interleaved; the table shows the median and
the fastest. Writes bench/results/cli_startup.json. No thresholds here: read the numbers.
    .venv/bin/python bench/cli_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.experiments.bench_results import write_result  # noqa: E402

COMMANDS = {
    "kp --help": [sys.executable, "-m", "pipeline", "--help"],
    "kp status --comp digits": [sys.executable, "-m", "pipeline", "status", "--comp", "digits"],
    "python -c pass": [sys.executable, "-c", "pass"],
    "import tensorflow": [sys.executable, "-c", "import tensorflow"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", action="append", choices=sorted(COMMANDS), help="time only these commands")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS if not args.only or name in args.only}
    for _ in range(args.repeats):
        for name in times:
            command = COMMANDS[name]
            start = time.perf_counter()
            subprocess.run(command, cwd=REPO, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    rows = [{"command": name, "median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
             "runs": len(t)} for name, t in times.items()]
    print(f"{'command':28} {'median s':>9} {'min s':>7}")
    for row in rows:
        print(f"{row['command']:28} {row['median_s']:9.3f} {row['min_s']:7.3f}")
    write_result("cli_startup.json", {"python": sys.version.split()[0], "rows": rows})


if __name__ == "__main__":
    main()
