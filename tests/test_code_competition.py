"""A code competition through the real kaggle client and the local server: kp kernel push uploads the bundle as a
dataset and the kernel, the server runs it offline on the public test set, kp submit --upload submits it and the
server reruns it on a hidden test set (more and other images) and scores it; a failed run leaves no ledger row."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.errors import PipelineError
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_predictions
from pipeline.kaggle.ledger import read_ledger
from tests.helpers import needs_shared_data
from tests.test_cv import CV, _cross_validated

SLUG = "synth-statefarm"
CODE = CV + ["competition.submission=code", "kernel.wheels=null", "kernel.poll_every_s=0.2", "kaggle.poll_every_s=0.2"]


def _options(sets):
    return [arg for assignment in sets for arg in ("--set", assignment)]


@pytest.fixture
def code_server(warm_project, kaggle_env, tmp_path):
    """The warm cv project's competition served as a code competition: `start(kernel_timeout_s)` starts the server
    (stopped after the test) and points the client at it."""
    from pipeline.kaggle.local.server import KaggleLocalServer

    warm_project("cv", _cross_validated)
    served = tmp_path / "served" / SLUG
    served.mkdir(parents=True)
    (served / f"{SLUG}.zip").symlink_to(load_config("synth", sets=CV).get("download.source"))
    test_ids = [f"img_{48 + i}.jpg" for i in range(6)]  # make_statefarm_like's test images after 48 training images
    (served / "solution.csv").write_text("img,classname\n" + "".join(f"{i},c{n % 3}\n" for n, i in enumerate(test_ids)))
    servers = []

    def start(kernel_timeout_s: float = 300):
        server = KaggleLocalServer(served.parent, log_dir=tmp_path / "server-log", scoring_delay_s=0.1,
                                   kernel_timeout_s=kernel_timeout_s).start()
        servers.append(server)
        for name, value in server.client_environment().items():
            kaggle_env.setenv(name, value)
        return server

    yield start
    for server in servers:
        server.stop()


def _kp(*args):
    return CliRunner().invoke(cli, [*args, "--comp", "synth", *_options(CODE)])


def test_a_pushed_kernel_reproduces_kp_offline_and_its_code_submission_is_scored_on_a_hidden_test_set(code_server):
    server = code_server()
    config = load_config("synth", sets=CODE)
    result = _kp("package")
    assert result.exit_code == 0, result.output
    bundle = config.work_dir / "package" / "bundle"
    record = json.loads((bundle / "bundle.json").read_text())
    cv = json.loads((config.work_dir / "cv" / "manifest.json").read_text())
    assert record["source"] == "cv" and len(record["models"]) == 4 and record["predict"]["tta"] is None
    assert record["fingerprints"]["cv"] == cv["fingerprint"] and record["fingerprints"]["precompute"]
    assert [m["from"] for m in record["models"]] == [run["key"] for run in cv["metrics"]["fold_runs"]]
    assert f"{record['size_bytes'] / 1e6:.1f} MB" in result.output

    result = _kp("kernel", "push", "--set", "kernel.kind=notebook")  # the slow dogs vs cats test pushes a script
    assert result.exit_code == 0, result.output
    assert json.loads((bundle / "bundle.json").read_text())["created"] == record["created"]  # the bundle was current
    pushed = json.loads((config.work_dir / "package" / "push.json").read_text())
    assert pushed["status"] == "complete" and pushed["kernel"] == "pipeline-test/synth-kp-inference"
    assert pushed["dataset"] == "pipeline-test/synth-kp-models" and "submission.csv" in pushed["outputs"]
    metadata = json.loads((config.work_dir / "package" / "kernel" / "kernel-metadata.json").read_text())
    assert metadata["enable_internet"] is False and metadata["competition_sources"] == [SLUG]
    assert metadata["kernel_type"] == "notebook" and metadata["code_file"] == "kernel.ipynb"

    output = config.work_dir / "package" / "output"  # the kernel's own files, downloaded through the client
    np.testing.assert_allclose(np.load(output / "test_probs.npy"), load_predictions(config.work_dir / "cv").test_probs,
                               atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(pd.read_csv(output / "submission.csv"),
                                  pd.read_csv(config.work_dir / "submit" / "submission.csv"))
    run = server.kernels.version("pipeline-test", "synth-kp-inference")
    assert run.run.isolated == server.kernels.isolate  # without network wherever the machine allows it

    result = _kp("submit", "--upload")  # the kernel already ran the current cv: submitted without a second push
    assert result.exit_code == 0, result.output
    assert len(server.kernels._kernels["pipeline-test/synth-kp-inference"]) == 1
    [row] = read_ledger(config.submissions_dir / "ledger.csv")
    assert row["kind"] == "code" and row["file"] == "pipeline-test/synth-kp-inference v1" and row["status"] == "complete"
    [rerun] = (run.folder).glob("submission-*/working/submission.csv")
    hidden = pd.read_csv(rerun)
    assert len(hidden) == 9 and hidden.img.tolist()[:6] == pd.read_csv(output / "submission.csv").img.tolist()
    hidden_solution = server.kernels.log_dir / "inputs" / SLUG / "hidden" / "solution.csv"
    score = server.competitions.score_file(SLUG, rerun, hidden_solution)
    assert float(row["lb_score"]) == pytest.approx(score, abs=1e-5)
    assert score != pytest.approx(server.competitions.score_file(SLUG, output / "submission.csv"), abs=1e-5)


def test_a_kernel_past_its_time_limit_or_without_a_submission_ends_with_one_message_and_no_ledger_row(code_server,
                                                                                                     tmp_path):
    from pipeline.kaggle import kernel_api
    from pipeline.shipping import code_submission

    server = code_server(kernel_timeout_s=2)
    config = load_config("synth", sets=CODE)
    result = _kp("submit", "--upload")
    assert result.exit_code == 2
    assert "kernel pipeline-test/synth-kp-inference version 1 failed: the kernel exceeded its time limit of 2 s" \
        in result.output
    assert read_ledger(config.submissions_dir / "ledger.csv") == []  # nothing was submitted
    result = _kp("kernel", "push")  # the kernel pushed again; the dataset already holds this bundle
    assert result.exit_code == 2 and "version 2 failed" in result.output and "not uploaded again" in result.output
    assert server.requests.count("POST /api/v1/datasets.DatasetApiService/CreateDataset") == 1

    folder = tmp_path / "quiet-kernel"  # a kernel that finishes without writing submission.csv
    folder.mkdir()
    (folder / "kernel.py").write_text(textwrap.dedent("""
        print("thinking about it")
    """))
    (folder / "kernel-metadata.json").write_text(json.dumps({
        "id": "pipeline-test/quiet-kernel", "title": "quiet-kernel", "code_file": "kernel.py", "language": "python",
        "kernel_type": "script", "enable_internet": False, "competition_sources": [SLUG]}))
    version = kernel_api.push_kernel(folder)
    pushed = {"kernel": "pipeline-test/quiet-kernel", "version": version}
    with pytest.raises(PipelineError, match="(?s)quiet-kernel version 1 failed: the kernel finished but wrote no "
                                            "submission.csv in its working folder\n.*thinking about it"):
        code_submission.follow(config, pushed, wait=True, say=lambda _: None)


DOGSCATS_CV = ["stages=[download, split, precompute, cv, submit]", "split.strategy=kfold", "split.folds=4",
               "cv.source=finetune", "finetune.augmented=false", "finetune.tta=false", "submit.source=cv",
               "competition.submission=code", "kernel.wheels=null", "kernel.poll_every_s=1", "kaggle.poll_every_s=1"]


@needs_shared_data
@pytest.mark.realdata
@pytest.mark.slow  # 79 s (2026-12-04): Lite2 features of 1,600 images, then two kernel runs
def test_dogscats_through_the_local_server_as_a_code_competition(project, kaggle_server):
    """The acceptance run: dogs vs cats downloaded, cross-validated on Lite2 features, its bundle and kernel pushed
    through the real client; the kernel's public submission equals kp's to 1e-6, the hidden rerun is scored."""
    from pipeline.engine import runner
    from pipeline.kaggle import leaderboard
    from pipeline.shipping import code_submission
    from tests.helpers import COMPETITIONS, REPO

    files = [project / "configs" / "offline" / "dogscats-kaggle.yaml"]
    weights = (REPO / load_config("dogscats", root=REPO, extra_files=files).get("precompute.weights")).resolve()
    config = load_config("dogscats", extra_files=files, sets=[f"precompute.weights={weights}", *DOGSCATS_CV])
    runner.run(config)
    pushed = code_submission.push(config, "cv", say=lambda _: None)
    assert pushed["status"] == "complete" and pushed["fingerprint"] == json.loads(
        (config.work_dir / "cv" / "manifest.json").read_text())["fingerprint"]
    output = config.work_dir / "package" / "output"
    np.testing.assert_allclose(np.load(output / "test_probs.npy"), load_predictions(config.work_dir / "cv").test_probs,
                               atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(pd.read_csv(output / "submission.csv"),
                                  pd.read_csv(config.work_dir / "submit" / "submission.csv"))

    row = leaderboard.upload(config, "acceptance", say=lambda _: None, submit_kernel=code_submission.submit)
    assert row["kind"] == "code" and row["status"] == "complete"
    slug = config.competition.slug
    run = kaggle_server.kernels.version(*pushed["kernel"].split("/"))
    [rerun] = run.folder.glob("submission-*/working/submission.csv")
    hidden = pd.read_csv(rerun)
    assert len(hidden) == 300 and set(pd.read_csv(COMPETITIONS / slug / "solution.csv").id) < set(hidden.id)
    assert float(row["lb_score"]) == pytest.approx(kaggle_server.competitions.score_file(
        slug, rerun, kaggle_server.kernels.log_dir / "inputs" / slug / "hidden" / "solution.csv"), abs=1e-5)
    assert float(row["lb_score"]) < 0.2  # 200 unseen test images and 100 training images the folds learned from


@needs_shared_data
@pytest.mark.realdata
@pytest.mark.slow  # 387 s (2026-12-06): four networks' features of 1,600 images, 16 fold heads, three kernel runs
def test_the_dogscats_blend_through_the_local_server_as_a_code_competition(project, kaggle_server):
    """The blend a competitor submits (four networks, each cross-validated, hill-climbed out of fold) as a code
    competition: `kp package --source blend` times it and states the estimate; the pushed kernel's test
    probabilities equal kp's blend to 1e-5; `kp submit --upload` submits the kernel, scored on the hidden set."""
    from pipeline.engine import runner
    from tests.helpers import REPO

    files = [project / "configs" / "offline" / name for name in ("dogscats-kaggle.yaml", "dogscats-blend.yaml")]
    base = load_config("dogscats", root=REPO, extra_files=files)
    absolute = [f"precompute.weights={(REPO / base.get('precompute.weights')).resolve()}"] + [
        f"features.{name}.weights={(REPO / base.get(f'features.{name}.weights')).resolve()}" for name in base.get("features")]
    sets = [*absolute, "competition.submission=code", "kernel.wheels=null", "kernel.poll_every_s=1",
            "kaggle.poll_every_s=1"]
    options = [arg for assignment in sets for arg in ("--set", assignment)]
    config = load_config("dogscats", extra_files=files, sets=sets)
    runner.run(config)
    config_options = [arg for path in files for arg in ("--config", str(path))]
    packaged = CliRunner().invoke(cli, ["package", "--comp", "dogscats", *config_options, *options, "--source", "blend"])
    assert packaged.exit_code == 0, packaged.output
    assert "Estimate for 200 hidden test images" in packaged.output and "within the limit of 9h00m" in packaged.output
    uploaded = CliRunner().invoke(cli, ["submit", "--comp", "dogscats", *config_options, *options, "--upload"])
    assert uploaded.exit_code == 0, uploaded.output
    output = config.work_dir / "package" / "output"
    np.testing.assert_allclose(np.load(output / "test_probs.npy"),
                               load_predictions(config.work_dir / "blend").test_probs, atol=1e-5, rtol=0)
    [row] = read_ledger(config.submissions_dir / "ledger.csv")
    assert row["kind"] == "code" and row["status"] == "complete" and "dogscats-kp-inference v" in row["file"]
    assert float(row["lb_score"]) < 0.2


def test_a_probe_kernel_sees_only_its_inputs_writes_only_its_folder_and_leaves_no_process_behind(code_server,
                                                                                                 tmp_path):
    """Run as a code submission, a hostile kernel reaches neither the hidden labels (through its input's parent
    or by absolute path) nor any other file; it writes only its working folder, as an unprivileged user; a
    process it daemonises ends with it."""
    import time

    from pipeline.kaggle import kernel_api
    from pipeline.kaggle.local.sandbox import confinement

    if confinement():
        pytest.skip(confinement())
    server = code_server()
    hidden = server.kernels.log_dir / "inputs" / SLUG / "hidden" / "solution.csv"
    public = tmp_path / "served" / SLUG / "solution.csv"
    folder = tmp_path / "probe-kernel"
    folder.mkdir()
    (folder / "kernel.py").write_text(textwrap.dedent(f"""
        import json, os, subprocess, sys
        from pathlib import Path
        root = Path(os.environ["KP_KAGGLE_ROOT"])
        seen = {{"uid": os.getuid()}}
        for name, path in {{"parent": root / "input" / "{SLUG}" / ".." / ".." / "hidden" / "solution.csv",
                            "hidden": Path("{hidden}"), "public": Path("{public}")}}.items():
            try:
                seen[name] = Path(path).read_text()[:20]
            except OSError as exc:
                seen[name] = type(exc).__name__
        for name, path in {{"server": Path("{server.kernels.log_dir}") / "pwned.txt",
                            "input": root / "input" / "{SLUG}" / "pwned.txt", "usr": Path("/usr/pwned.txt")}}.items():
            try:
                Path(path).write_text("x")
                seen["wrote " + name] = True
            except OSError as exc:
                seen["wrote " + name] = type(exc).__name__
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2); "
                          "open('/kaggle/working/late.txt', 'w').write('still here')"], start_new_session=True)
        (root / "working" / "probe.json").write_text(json.dumps(seen))
        (root / "working" / "submission.csv").write_text((root / "input" / "{SLUG}" / "sample_submission.csv").read_text())
    """))
    (folder / "kernel-metadata.json").write_text(json.dumps({
        "id": "pipeline-test/probe", "title": "probe", "code_file": "kernel.py", "language": "python",
        "kernel_type": "script", "enable_internet": False, "competition_sources": [SLUG]}))
    version = kernel_api.push_kernel(folder)
    kernel_api.wait_for_kernel("pipeline-test/probe", 120, 0.2, lambda _: None)
    kernel_api.submit_code(SLUG, "pipeline-test/probe", version, "submission.csv", "probe")
    time.sleep(3)  # past the daemon's write
    run = server.kernels.version("pipeline-test", "probe")
    [rerun] = run.folder.glob("submission-*/working")
    for working in (run.folder / "run" / "working", rerun):
        seen = json.loads((working / "probe.json").read_text())
        assert seen["uid"] == 65534
        assert {seen[name] for name in ("parent", "hidden", "public")} == {"FileNotFoundError"}, seen
        assert all(seen[f"wrote {name}"] in ("FileNotFoundError", "OSError", "PermissionError") for name in
                   ("server", "input", "usr")), seen
        assert not (working / "late.txt").exists()
    assert hidden.is_file() and not (server.kernels.log_dir / "pwned.txt").exists()
