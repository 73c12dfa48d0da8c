"""`make all COMP=digits` end to end: the README's first command, through the real Makefile; and the
TensorFlow the Makefile installs, chosen by whether a GPU answers."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers import REPO


@pytest.mark.skipif(not (REPO / ".venv" / ".installed").exists(),
                    reason="no .venv yet: `make test` creates it (this test must not install one)")
def test_make_all_digits(tmp_path):
    work = tmp_path / "work"
    args = f"ARGS=--set paths.work={work} --set ensemble.n=1"  # the Makefile's path, not the ensemble's size
    done = subprocess.run(["make", "all", "COMP=digits", args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "split       up to date" in done.stdout
    assert "accuracy on valid" in done.stdout and "submissions/digits/digits-ensemble-" in done.stdout
    status = subprocess.run(["make", "--no-print-directory", "status", "COMP=digits",
                             f"ARGS=--json --set paths.work={work} --set ensemble.n=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    payload = json.loads(status.stdout[status.stdout.index("{"):])
    assert [s["state"] for s in payload["stages"]] == ["up to date"] * len(payload["stages"])
    assert (work / "digits" / "split" / "split.csv").is_file()
    assert payload["stages"][-1]["metrics"]["val_accuracy"] > 0.95  # a 1-member ensemble (0.98 measured), on 300 validation digits


@pytest.mark.parametrize("answer, flavour", [("exit 0", "gpu"), ("exit 9", "cpu"), (None, "cpu")])
def test_the_venv_installs_the_tensorflow_that_the_machine_can_use(tmp_path, answer, flavour):
    """nvidia-smi answering (a GPU is there) -> the gpu extra, tensorflow[and-cuda]; failing or absent -> cpu."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if answer is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{answer}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    env.pop("TF", None)
    plan = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=REPO, env=env, capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    assert f"-e '.[test,ray,{flavour}]'" in plan.stdout
    assert f"uninstall --quiet --yes {'tensorflow-cpu' if flavour == 'gpu' else 'tensorflow'} " in plan.stdout
    forced = subprocess.run(["make", "-n", "-B", ".venv/.installed", "TF=gpu"], cwd=REPO, env=env, capture_output=True,
                            text=True)
    assert "-e '.[test,ray,gpu]'" in forced.stdout
