"""kp report: one self-contained HTML page with every stage of the run, checked as HTML and in a real browser."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.cache import Manifest
from pipeline.engine.config import load_config
from tests.helpers import make_statefarm_like, statefarm_like_config
from tests.test_transfer import TINY_VGG

SETS = [s.replace("finetune, submit", "finetune, ensemble, submit") for s in TINY_VGG] + ["ensemble.n=2",
                                                                                          "submit.source=ensemble"]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.links = set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("href", "src"):
            if key in attrs and not attrs[key].startswith(("#", "data:")):
                self.links.append(attrs[key])


def _every_stage(root):
    archive = make_statefarm_like(root.parent / "data", drivers=4, classes=3, per_driver_class=4, test=4)
    statefarm_like_config(root, archive)
    args = [arg for s in SETS for arg in ("--set", s)]
    assert CliRunner().invoke(cli, ["all", "--comp", "synth", *args], catch_exceptions=False).exit_code == 0


@pytest.fixture
def report(warm_project):
    """`kp report` on a copy of the synthetic competition run through every stage once per session."""
    warm_project("report", _every_stage)
    args = [arg for s in SETS for arg in ("--set", s)]
    result = CliRunner().invoke(cli, ["report", "--comp", "synth", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = load_config("synth", sets=SETS)
    path = config.work_dir / "report.html"
    assert result.output.strip() == str(path)
    return config, path


def test_the_report_holds_every_stage_its_scores_and_only_embedded_images(report):
    config, path = report
    html = path.read_text()
    page = _Page()
    page.feed(html)
    assert {f"stage-{name}" for name in config.stage_names} <= page.ids
    assert page.links == []  # self-contained: nothing to fetch
    assert len(page.images) == 7  # the submitted ensemble's confusion and its members' curves; finetune: loss,
    for src in page.images:       # confusion, top losses; ensemble: top losses, members
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("finetune", "ensemble"):
        loss = Manifest.read(config.work_dir / stage).metrics["val_log_loss"]
        assert re.search(rf"<td>{stage}</td>\s*<td>holdout</td>\s*<td>{loss:.4f}</td>", html), stage
    assert "up to date" in html and "Ledger" in html
    assert "submitted" in page.ids and 'alt="ensemble confusion matrix"' in html  # what is submitted, in full
    assert 'alt="ensemble learning curves"' in html
    assert re.search(r"<tr><td>c0</td><td>\d+</td><td>(\d\.\d{3}|-)</td><td>(\d\.\d{3}|-)</td></tr>", html)
    assert "<summary>The settings it ran with" in html and "<td>ensemble.n</td><td>2</td>" in html
    text = re.sub(r"<[^>]+>", "", html.split("<script>")[0])
    assert "`" not in text  # quoted keys and commands are set as code, not shown as backticks


@pytest.mark.browser
def test_the_report_renders_in_headless_chromium_with_every_image_loaded(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make browser installs Debian's package where it can)")
    from PIL import Image

    _, path = report
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--virtual-time-budget=10000", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r'<body data-images-total="(\d+)" data-images-loaded="(\d+)"', dom)
    assert body and int(body[1]) == 7 and body[1] == body[2], body and body.groups()
    shot = tmp_path / "report.png"
    subprocess.run([*flags, "--window-size=1200,1600", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1600, 1200)
    assert (pixels < 128).mean() > 0.01 and len(np.unique(pixels)) > 50  # text and plots, not a blank page


def test_a_report_of_a_competition_that_never_ran_leaves_a_work_folder_kp_owns(project):
    runner = CliRunner()
    cheap = ["--set", "stages=[download, split]"]
    result = runner.invoke(cli, ["report", "--comp", "digits", *cheap])
    assert result.exit_code == 0, result.output
    assert (project / "work" / "digits" / ".kp-work").is_file()  # kp's: later runs and kp clean may use it
    assert runner.invoke(cli, ["all", "--comp", "digits", *cheap]).exit_code == 0


def test_the_report_says_what_changed_since_the_run_before_of_what_is_submitted(warm_project):
    warm_project("report", _every_stage)
    more = [*SETS, "ensemble.n=3"]  # one more member: the ensemble's new run, two members reused
    args = [arg for s in more for arg in ("--set", s)]
    assert CliRunner().invoke(cli, ["all", "--comp", "synth", *args], catch_exceptions=False).exit_code == 0
    assert CliRunner().invoke(cli, ["report", "--comp", "synth", *args]).exit_code == 0
    html = (load_config("synth", sets=more).work_dir / "report.html").read_text()
    assert re.search(r"Since the run before \(\w{16}, [\d-]+ [\d:]+\): val_log_loss \d\.\d{5} &rarr; \d\.\d{5}", html)
    assert "<tr><td>ensemble.n</td><td>2</td><td>3</td></tr>" in html
