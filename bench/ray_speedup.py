"""Ray on one machine: precompute shards and ensemble members on 1 vs 2 Ray workers against the local backend.

Each repetition runs, interleaved, three variants in fresh work folders: `compute.backend: local`,
`ray` with a local cluster of 1 CPU, and `ray` with 2 CPUs; each does precompute (shards of
`--shard-size` images on Ray) and then an ensemble of `--members` heads on those features. Prints
the median seconds per stage and the speed-ups over local; writes bench/results/ray_speedup_COMP.json.
    .venv/bin/python bench/ray_speedup.py --comp dogscats --config configs/offline/dogscats.yaml
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.engine import runner  # noqa: E402
from pipeline.engine.config import load_config  # noqa: E402
from pipeline.experiments.bench_results import write_result  # noqa: E402

VARIANTS = {"local": ["compute.backend=local"],
            "ray, 1 CPU": ["compute.backend=ray", "compute.local_cpus=1"],
            "ray, 2 CPUs": ["compute.backend=ray", "compute.local_cpus=2"]}
STAGES = ("precompute", "ensemble")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comp", required=True)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=400)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="applied to every variant")
    args = parser.parse_args()
    import ray

    common = ["stages=[download, split, precompute, ensemble]", "finetune.augmented=false", "finetune.tta=false",
              "ensemble.source=finetune", f"ensemble.n={args.members}", f"compute.shard_size={args.shard_size}"]
    seconds = {name: {stage: [] for stage in STAGES} for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, sets in VARIANTS.items():
            work = Path(tempfile.mkdtemp(prefix="kp-ray-bench-"))
            config = load_config(args.comp, extra_files=args.config,
                                 sets=[*common, *sets, *args.sets, f"paths.work={work}"])
            runner.run(config, ["download", "split"])
            for stage in STAGES:
                start = time.perf_counter()
                runner.run(config, [stage])
                seconds[name][stage].append(time.perf_counter() - start)
            if ray.is_initialized():
                ray.shutdown()  # the next variant starts its own cluster (counted in its times)
            shutil.rmtree(work, ignore_errors=True)
            print(json.dumps({"repeat": repeat, "variant": name,
                              **{stage: round(seconds[name][stage][-1], 1) for stage in STAGES}}), flush=True)
    medians = {name: {stage: statistics.median(v) for stage, v in stages.items()} for name, stages in seconds.items()}
    print(f"\n{'variant':14} " + " ".join(f"{stage + ' s':>12} {'vs local':>9}" for stage in STAGES))
    for name, stages in medians.items():
        print(f"{name:14} " + " ".join(f"{stages[s]:12.1f} {medians['local'][s] / stages[s]:9.2f}x" for s in STAGES))
    write_result(f"ray_speedup_{args.comp}.json", {"competition": args.comp, "config": args.config, "members": args.members,
                               "shard_size": args.shard_size, "seconds": seconds, "medians": medians})


if __name__ == "__main__":
    main()
