"""The kp command line through click's CliRunner, `python -m pipeline`, and its start-up weight."""
from __future__ import annotations

import json
import re
import subprocess
import sys

from click.testing import CliRunner

from pipeline.cli.commands import cli
from tests.helpers import REPO


CHEAP = ["--set", "stages=[download, split]"]  # digits' cheap stages: these tests are about the CLI


def kp(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_stage_commands_first_then_the_rest(project):
    result = kp("--help")
    assert result.exit_code == 0
    commands = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines()
                if line.startswith("  ") and not line.startswith("   ")]
    stages = ["augment", "blend", "bnretrain", "cv", "distill", "download", "ensemble", "finetune", "precompute", "pseudo",
              "smooth", "split", "submit", "tune"]
    assert sorted(commands[:len(stages)]) == stages  # the stages first
    assert commands[len(stages):] == ["all", "backbones", "clean", "config", "kernel", "ledger", "lr-find", "package", "report",
                                      "runs",
                                      "show", "status", "sweep"]
    assert "--set" in kp("split", "--help").output


def test_all_then_status_table_and_json(project):
    result = kp("all", "--comp", "digits", *CHEAP)
    assert result.exit_code == 0, result.output
    table = kp("status", "--comp", "digits", *CHEAP).output
    assert "download  up to date" in table and "1,497 train / 300 test" in table
    stale = kp("status", "--comp", "digits", *CHEAP, "--set", "split.fraction=0.25").output
    assert "split     stale" in stale and "config split.fraction: 0.2 -> 0.25" in stale
    payload = json.loads(kp("status", "--comp", "digits", *CHEAP, "--json").output)
    assert [s["stage"] for s in payload["stages"]] == ["download", "split"]
    split = payload["stages"][1]
    assert split["state"] == "up to date" and split["metrics"]["n_valid"] == 300 and split["duration_s"] >= 0


def test_stage_command_runs_what_it_needs_and_force_reruns(project):
    assert kp("split", "--comp", "digits", *CHEAP).exit_code == 0
    result = kp("split", "--comp", "digits", *CHEAP, "--force")
    assert result.exit_code == 0
    assert "download: up to date, skipped" in result.output
    assert "split: running (forced)" in result.output


def test_clean_one_stage_then_all(project):
    kp("all", "--comp", "digits", *CHEAP)
    work = project / "work" / "digits"
    assert kp("clean", "--comp", "digits", *CHEAP, "--stage", "split", "--yes").exit_code == 0
    assert (work / "download").is_dir() and not (work / "split").exists()
    assert "split     missing" in kp("status", "--comp", "digits", *CHEAP).output
    assert kp("clean", "--comp", "digits", *CHEAP, "--yes").exit_code == 0
    assert not work.exists()


def test_errors_exit_2_with_one_clear_line(project):
    result = CliRunner().invoke(cli, ["status", "--comp", "nope"])
    assert result.exit_code == 2
    assert "unknown competition 'nope'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["all", "--comp", "digits", *CHEAP, "--set", "split.fracton=0.1"])
    assert result.exit_code == 2 and "did you mean 'fraction'" in result.output


def test_config_shows_where_each_value_came_from(project):
    output = kp("config", "--comp", "statefarm", "--set", "split.seed=3").output
    assert 'split.seed = 3    # --set split.seed=3' in output
    assert 'download.groups.group_column = "subject"    # configs/statefarm.yaml' in output
    assert 'split.folds = 5    # configs/defaults.yaml' in output


def test_python_m_pipeline_and_no_tensorflow_at_start_up():
    probe = (
        "import sys\n"
        "from pipeline.cli.commands import cli\n"
        "for args in (['--help'], ['status', '--comp', 'digits'], ['split', '--help']):\n"
        "    try:\n"
        "        cli(args, prog_name='kp')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'sklearn', 'albumentations', 'kaggle', 'pandas')\n"
        "               if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    help_text = subprocess.run([sys.executable, "-m", "pipeline", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert help_text.returncode == 0 and "Usage: kp" in help_text.stdout


def test_help_reads_the_stage_list_without_importing_stages_or_pydantic():
    probe = ("import sys\nfrom pipeline.cli.commands import cli\n"
             "try:\n    cli(['--help'], prog_name='kp')\nexcept SystemExit:\n    pass\n"
             "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('stages', 'pydantic', 'numpy', 'yaml')))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "LOADED []" in done.stdout, done.stdout + done.stderr
    assert all(name in done.stdout for name in ("download", "split", "precompute", "finetune", "ensemble", "submit"))


def test_a_second_run_names_the_run_that_holds_the_lock_and_waits_for_it_with_wait(project):
    """`kp split` while another process holds digits' lock stops at once, naming its process, command and how
    long it has held it; `kp split --wait` starts once that process lets go."""
    import time

    work = project / "work" / "digits"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom pipeline.core.cache import "
         "competition_lock\nwith competition_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n"
         "    time.sleep(2.5)\n", str(work)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = CliRunner().invoke(cli, ["split", "--comp", "digits", *CHEAP])
        assert refused.exit_code == 2
        assert f"another kp run holds this competition's lock: process {holder.pid} (`kp {work}`), for " in refused.output
        assert "--wait" in refused.output
        started = time.monotonic()
        waited = CliRunner().invoke(cli, ["split", "--comp", "digits", "--wait", *CHEAP])
        assert waited.exit_code == 0, waited.output
        assert holder.poll() is not None and time.monotonic() - started > 1  # it ran once the holder had gone
        assert "waiting: another kp run holds this competition's lock" in waited.output
        assert (work / "split" / "split.csv").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_status_and_submit_act_on_the_settings_of_the_last_run(project):
    """After `kp all --set ...`, a plain `kp status` reads the settings that ran (saying so) and finds every
    stage up to date; --as-configured compares with the files; `kp submit --upload` on settings whose stages
    are stale stops before anything trains or uploads, naming the stage and the command that brings it up to date."""
    ran = ["--set", "stages=[download, split]", "--set", "split.fraction=0.25"]
    assert kp("all", "--comp", "digits", *ran).exit_code == 0
    result = CliRunner().invoke(cli, ["status", "--comp", "digits"])
    assert result.exit_code == 0
    assert "settings of the last run: --set 'stages=[download, split]' --set split.fraction=0.25" in result.output
    assert "split     up to date" in result.output and not re.search(r"^\w+ +(stale|missing)", result.output, re.M)
    from pipeline.engine.last_run import own_settings

    assert not own_settings([], ["paths.work=elsewhere", "cache.wait=true"])  # where, and --wait: no settings
    configured = kp("status", "--comp", "digits", "--as-configured").output
    assert "settings of the last run" not in configured and "split.fraction: 0.25 -> 0.2" in configured
    refused = CliRunner().invoke(cli, ["submit", "--comp", "digits", "--upload", "--set", "submit.source=finetune",
                                       "--set", "stages=[download, split, precompute, finetune, submit]"])
    assert refused.exit_code == 2
    assert "kp submit --upload uploads what ran and trains nothing: precompute is missing (never run)" in refused.output
    assert ("bring it up to date first: kp all --comp digits --set submit.source=finetune --set 'stages=[download, "
            "split, precompute, finetune, submit]'") in refused.output
    assert not (project / "work" / "digits" / "finetune").exists()


def test_stages_show_in_run_order_with_the_submitted_one_marked_and_runs_have_one_header(warm_project):
    """An ensemble of finetune's heads comes after finetune everywhere; `kp runs` shows the competition's
    own score (accuracy for digits) under one header, and a leaderboard column only once a run was uploaded."""
    from tests.test_faults import DIGITS_CHEAP, _digits_cheap

    warm_project("digits-cheap", _digits_cheap)
    sets = [arg for s in DIGITS_CHEAP for arg in ("--set", s)]
    table = kp("status", "--comp", "digits", *sets).output.splitlines()
    names = [line.split()[0] for line in table[2:8]]
    assert names == ["download", "precompute", "split", "finetune", "ensemble", "submit"], table
    assert any(line.startswith("ensemble *") for line in table)
    assert "* submitted: ensemble's predictions are what kp submit writes (submit.source)" in table
    runs = kp("runs", "--comp", "digits", *sets, "--sort").stdout.splitlines()
    assert runs[0].split()[:4] == ["stage", "run", "val_accuracy", "validation"] and "leaderboard" not in runs[0]
    column = runs[0].index("val_accuracy")
    accuracies = [float(line[column:].split()[0]) for line in runs[1:]]
    assert accuracies == sorted(accuracies, reverse=True) and len(accuracies) >= 2


def test_clean_prints_what_it_would_delete_and_without_a_terminal_deletes_only_with_yes(project):
    assert kp("all", "--comp", "digits", *CHEAP).exit_code == 0
    work = project / "work" / "digits"
    dry = kp("clean", "--comp", "digits", *CHEAP, "--dry-run")
    assert dry.exit_code == 0 and f"kp clean would delete {work}, that is:" in dry.output
    assert re.search(r"\d+\.\d MB  _runs", dry.output) and " in all" in dry.output and work.is_dir()
    refused = CliRunner().invoke(cli, ["clean", "--comp", "digits", *CHEAP], input="")  # stdin is no terminal
    assert refused.exit_code == 2 and "no terminal to ask on, so nothing was deleted; pass --yes" in refused.output
    assert (work / "split").exists()
    assert kp("clean", "--comp", "digits", *CHEAP, "--stage", "split", "--yes").exit_code == 0
    assert not (work / "split").exists() and (work / "download").exists()
    assert kp("clean", "--comp", "digits", *CHEAP, "--yes").exit_code == 0 and not work.exists()


def test_version_bare_kp_and_json_read_commands(project):
    assert re.fullmatch(r"kp \d+\.\d+\.\d+\n", kp("--version").output)
    bare = kp()
    assert bare.exit_code == 0 and bare.output.startswith("Usage: ") and "Commands:" in bare.output
    assert json.loads(kp("ledger", "--comp", "digits", "--json").output) == []
    assert {"name", "preprocessing", "width"} <= set(json.loads(kp("backbones", "--json").output)[0])
    described = kp("config", "--comp", "digits", "split.fraction", "competition.submission").output.splitlines()
    assert described[0].startswith('competition.submission = "csv"') and "code competition" in described[1]
    assert described[2].startswith("split.fraction = 0.2") and "share of training rows held out" in described[3]
    keys = {row["key"]: row for row in json.loads(kp("config", "--comp", "digits", "--json", "split").output)}
    assert keys["split.fraction"]["value"] == 0.2 and keys["split.fraction"]["source"] == "configs/digits.yaml"
    assert "no such key or section (did you mean 'split'?)" in CliRunner().invoke(cli, ["config", "splt"]).output


def test_dry_run_prints_the_plan_and_writes_nothing(project):
    dry = kp("all", "--comp", "digits", *CHEAP, "--dry-run")
    assert dry.exit_code == 0 and re.search(r"^download\s+run\s+never run$", dry.output, re.M)
    assert "dry run: nothing was run or written" in dry.output and not (project / "work").exists()
    assert kp("all", "--comp", "digits", *CHEAP).exit_code == 0
    again = kp("split", "--comp", "digits", *CHEAP, "--set", "split.seed=7", "--dry-run")
    assert re.search(r"^download\s+skip\s+up to date$", again.output, re.M)
    assert re.search(r"^split\s+run\s+config split.seed: 42 -> 7$", again.output, re.M), again.output


def test_quiet_keeps_only_the_result_and_an_upload_without_credentials_stops_before_any_stage(project, kaggle_env):
    quiet = CliRunner().invoke(cli, ["-q", "all", "--comp", "digits", *CHEAP])
    assert quiet.exit_code == 0 and "[digits]" not in quiet.stderr and "download" in quiet.stdout
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        kaggle_env.delenv(name)
    upload = CliRunner().invoke(cli, ["all", "--comp", "digits", "--upload"])  # hours of stages, then an upload
    assert upload.exit_code == 2 and "Kaggle credentials not found" in upload.output
    assert "leave out --upload" in upload.output and "download.source" not in upload.output
    assert "running" not in upload.output and not (project / "work" / "digits" / "precompute").exists()


def test_progress_on_a_terminal_never_shares_a_line_with_a_log_line_and_a_log_file_has_no_bars(warm_project):
    """An ensemble member trained by a real `kp` on a pseudo-terminal: every bar redraw and every log line
    are apart (tqdm.write), TensorFlow's own lines are gone; a run whose stderr is no terminal has plain lines
    only."""
    import os
    import pty

    from tests.test_faults import DIGITS_CHEAP, _digits_cheap

    root = warm_project("digits-cheap", _digits_cheap)
    args = [sys.executable, "-m", "pipeline", "ensemble", "--comp", "digits",
            *[arg for s in DIGITS_CHEAP for arg in ("--set", s)], "--set", "ensemble.n=1", "--set", "ensemble.seed=50"]
    env = {**os.environ, "KP_ROOT": str(root), "COLUMNS": "120"}
    main, secondary = pty.openpty()
    process = subprocess.Popen(args, stdin=secondary, stdout=secondary, stderr=secondary, env=env, cwd=REPO)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    pieces = [piece for line in text.split("\n") for piece in line.split("\r")]
    bars = [piece for piece in pieces if "%|" in piece]
    assert bars, text  # bars were drawn on the terminal
    assert not [piece for piece in bars if "[digits] " in piece.split("%|")[1]], text
    assert any("epoch" in piece for piece in bars) or any(": epoch " in piece for piece in pieces), text
    assert "InitializeLog" not in text and "oneDNN" not in text and "Epoch 1/" not in text
    assert "\x1b[32mup to date\x1b[0m" in text  # the status table, coloured on a terminal
    plain = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", piece) for piece in pieces]
    table = plain[next(i for i, piece in enumerate(plain) if piece.startswith("stage ")):]
    assert max(len(line) for line in table) <= 120  # the status table within the terminal's width (COLUMNS)

    piped = CliRunner().invoke(cli, [*args[3:-3], "ensemble.n=1", "--set", "ensemble.seed=60"])  # stderr: no terminal
    assert piped.exit_code == 0, piped.output
    assert "%|" not in piped.stderr and "\r" not in piped.stderr
    assert re.search(r"^\[digits\] member 1/1 \(seed 60\): epoch 1/1, loss [\d.]+", piped.stderr, re.M), piped.stderr
