"""`make all COMP=digits` end to end: the README's first command, through the real Makefile."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import REPO


@pytest.mark.skipif(not (REPO / ".venv" / ".installed").exists(),
                    reason="no .venv yet: `make test` creates it (this test must not install one)")
def test_make_all_digits(tmp_path):
    work = tmp_path / "work"
    args = f"ARGS=--set paths.work={work} --set ensemble.n=2"  # the Makefile's path, not the ensemble's size
    done = subprocess.run(["make", "all", "COMP=digits", args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "split       up to date" in done.stdout
    assert "accuracy on valid" in done.stdout and "submissions/digits/digits-ensemble-" in done.stdout
    status = subprocess.run(["make", "--no-print-directory", "status", "COMP=digits",
                             f"ARGS=--json --set paths.work={work} --set ensemble.n=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    payload = json.loads(status.stdout[status.stdout.index("{"):])
    assert [s["state"] for s in payload["stages"]] == ["up to date"] * len(payload["stages"])
    assert (work / "digits" / "split" / "split.csv").is_file()
    assert payload["stages"][-1]["metrics"]["val_accuracy"] > 0.95  # a 2-member ensemble, on 300 validation digits
