"""The `kp` command line: one command per stage, plus `all`, `status`, `config` and `clean`.

    kp [-q | -v] COMMAND ...               quiet (warnings, errors, results) / TensorFlow's own lines too
    kp STAGE  --comp NAME [--config FILE ...] [--set dotted.key=value ...] [--force] [--dry-run]
    kp submit --comp NAME [--upload [-m MESSAGE]]   write the submission; upload it and read the score
    kp all    --comp NAME [--upload [-m MESSAGE]]   every listed stage: skipped, restored or run
    kp status --comp NAME [--json]         up to date / restored / stale (and why) / missing; run cache; ledger
    kp ledger --comp NAME [--refresh]      validation vs leaderboard of every upload; ledger.png
    kp config --comp NAME [KEY ...] [--json]   the merged config, each value with the file that set it
    kp config --defaults                   write configs/defaults.yaml and docs' key table from the code
    kp lr-find --comp NAME [--stage S] [--apply]   learning-rate range test: suggested rates, lr_find.png
    kp show   --comp NAME [--augmented]     a grid of training images with their labels, as a PNG
    kp report --comp NAME                  one self-contained HTML page of everything the run left
    kp sweep  --comp NAME --grid KEY=V1,V2 [--grid ...] | --search SPACE.yaml --trials N   trials on the run cache
    kp runs   --comp NAME [--stage S] [--sort] [--json] [--best [--apply FILE]]   every stored run, side by side
    kp clean  --comp NAME [--stage S] [--keep-last N] [--dry-run] [--yes]   what it would delete, then asks
    kp package --comp NAME [--source STAGE] [--wheels 3.11]   an offline inference bundle for a kernel
    kp kernel push --comp NAME [--source STAGE]   the bundle as a dataset, the kernel pushed and run
    kp kernel status --comp NAME [--wait]         how the pushed kernel's run stands

Stage commands are built from the stage modules' files (read, not imported), so a new module in
`stages/` is a new command and `kp --help` imports no stage. This module and everything it imports
at the top stay free of TensorFlow and pandas. Any PipelineError or OSError ends as one line and
exit status 2 (Ctrl-C: 130).
"""
from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline.core.errors import PipelineError, describe_os_error
from pipeline.training.recipes import NAMES as RECIPE_NAMES

if TYPE_CHECKING:
    from pipeline.engine.config import ResolvedConfig

DEFAULT_COMP = "digits"


class _UserError(click.ClickException):
    exit_code = 2


class _Interrupted(click.ClickException):
    exit_code = 130  # the shell's code for Ctrl-C


def _config_options(command):
    command = click.option(
        "--set", "sets", multiple=True, metavar="KEY=VALUE",
        help="Override one config value (dotted key, YAML value); repeatable, applied last.",
    )(command)
    command = click.option(
        "--config", "extra_files", multiple=True, type=click.Path(dir_okay=False), metavar="FILE",
        help="An extra YAML file merged over the competition's (e.g. configs/offline/NAME.yaml); repeatable.",
    )(command)
    command = click.option(
        "--comp", default=lambda: os.environ.get("KP_COMP", DEFAULT_COMP), show_default="$KP_COMP or digits",
        help="Competition: the name of a file in configs/.",
    )(command)
    return command


def _wait_option(command):
    """`--wait`: a command that takes the competition's lock waits for another kp run to let go of it
    (`cache.wait`), instead of stopping at once and naming it. Put above `_config_options`."""
    @functools.wraps(command)
    def waiting(*args, wait: bool = False, **kwargs):
        if wait:
            kwargs["sets"] = (*kwargs["sets"], "cache.wait=true")
        return command(*args, **kwargs)

    return click.option("--wait", is_flag=True, help=(
        "If another kp run holds this competition's lock, wait for it to finish instead of stopping."))(waiting)


def _load(comp: str, extra_files, sets, shallow: bool = False):
    from pipeline.engine.config import load_config

    return load_config(comp, extra_files=list(extra_files), sets=list(sets), shallow=shallow)


def _settled(comp, extra_files, sets, as_configured: bool, shallow: bool = False):
    """The config a command acts on: its own settings, else (none but `paths.*`) those of the last run in the
    work folder (`pipeline.engine.last_run`), said in one line; `as_configured`: the config files alone.

    Returns:
        (the config, the config files and the `--set`s it was loaded with).
    """
    from pipeline.core.artifacts import LAST_RUN_FILE
    from pipeline.engine import last_run

    config = _load(comp, extra_files, sets, shallow)
    record = None if as_configured or last_run.own_settings(extra_files, sets) else last_run.recalled(config.work_dir)
    if record is None:
        return config, extra_files, sets
    click.echo(f"[{comp}] settings of the last run: {last_run.described(record)} (--as-configured: the config "
               "files alone)", err=True)
    files, recalled_sets = record["config"], (*record["set"], *sets)
    try:
        return _load(comp, files, recalled_sets, shallow), files, recalled_sets
    except PipelineError as exc:
        raise PipelineError(f"{config.work_dir / LAST_RUN_FILE}: the settings of the last run no longer load ({exc}); "
                            "pass --as-configured to use the config files alone") from None


def _as_configured_option(command):
    return click.option("--as-configured", is_flag=True, help=(
        "Use the config files (and this command's --set) alone, not the settings the last run in the work "
        "folder ran with."))(command)


def _run(comp, extra_files, sets, targets, force, upload=False, message=None,
         config: ResolvedConfig | None = None, dry_run: bool = False) -> None:
    """Run `targets` (None: every listed stage) under the given settings, remembered as the last run's;
    `config`: already loaded from them; `dry_run`: print the plan instead (`_echo_plan`)."""
    from pipeline.engine import last_run, runner
    from pipeline.engine.registry import all_stages
    from pipeline.engine.status import format_table

    config = config or _load(comp, extra_files, sets)
    if dry_run:
        return _echo_plan(config, targets, force)
    if upload and targets is None:  # kp all --upload (kp submit --upload checked already)
        _check_can_upload(config)
    if upload and not any(all_stages()[name].submits for name in config.stage_names):
        raise PipelineError(f"--upload: {comp!r} has no submit stage in its stage list {config.stage_names}")
    last_run.remember(config.work_dir, extra_files, sets)
    statuses = runner.run(config, targets, force=force)
    _echo_table(format_table(statuses, config.get("submit.source")))
    if upload:
        from pipeline.kaggle import leaderboard
        from pipeline.shipping import code_submission

        leaderboard.upload(config, message, again=force, say=lambda line: click.echo(f"[{comp}] {line}", err=True),
                           submit_kernel=code_submission.submit)
        _echo_ledger(config, last=3)


STATE_COLOURS = {"up to date": "green", "stale": "yellow", "missing": "red"}


def _echo_table(table: str) -> None:
    """A table of `kp status` on stdout: on a terminal each state coloured (none with NO_COLOR set) and each
    line cut to the terminal's width (`...` at the end); elsewhere as it is."""
    if not sys.stdout.isatty():
        click.echo(table)
        return
    width = shutil.get_terminal_size().columns
    colour = not os.environ.get("NO_COLOR")
    for line in table.splitlines():
        shown = line if len(line) <= width else line[:max(width - 3, 10)] + "..."
        if colour:
            for state, fg in STATE_COLOURS.items():
                at = shown.find(f"  {state}")
                if at >= 0:
                    shown = shown[:at + 2] + click.style(state, fg=fg) + shown[at + 2 + len(state):]
                    break
        click.echo(shown)


def _check_can_upload(config: ResolvedConfig) -> None:
    """Before any stage runs for an upload (no hour of training ends in "no credentials"): the credentials,
    and the competition open to this account (`pipeline.kaggle.submissions.check_can_submit`)."""
    from pipeline.kaggle.api import Network
    from pipeline.kaggle.submissions import check_can_submit

    check_can_submit(config.competition.slug, Network.of(config.kaggle))


def _echo_plan(config: ResolvedConfig, targets, force: bool) -> None:
    """`--dry-run`: each stage the run would reach, in order, and what it would do and why; reads only (no
    lock, no last-run record, nothing written)."""
    from pipeline.engine.runner import plan
    from pipeline.engine.status import UP_TO_DATE, stage_statuses

    order = plan(config, targets)
    statuses = {s.name: s for s in stage_statuses(config)}
    forced = set(order if targets is None else targets) if force else set()
    rows = []
    for name in order:
        status = statuses[name]
        why = "; ".join(status.reasons)
        if name in forced:
            rows.append((name, "run", "forced"))
        elif status.state == UP_TO_DATE:
            rows.append((name, "skip", "up to date"))
        elif status.restorable:
            rows.append((name, "restore", f"from the run cache ({why})"))
        else:
            rows.append((name, "run", why))
    width = max(len(name) for name, _, _ in rows)
    for name, action, why in rows:
        click.echo(f"{name.ljust(width)}  {action:<7}  {why}")
    click.echo("dry run: nothing was run or written (a stage after one that runs may turn out up to date once "
               "that one has run and written the same outputs)")


def _dry_run_option(command):
    return click.option("--dry-run", is_flag=True, help=(
        "Print each stage the run would reach and what it would do (skip, restore, run) and why; run nothing."))(command)


def _upload_options(command):
    command = click.option("-m", "--message", default=None,
                           help="With --upload: the submission's description (the config fingerprint is added).")(command)
    return click.option("--upload", is_flag=True,
                        help="Then upload the submission to Kaggle, wait for its public score and add it to "
                             "submissions/COMP/ledger.csv.")(command)


def _echo_ledger(config: ResolvedConfig, last: int | None = None) -> None:
    from pipeline.kaggle.ledger import format_ledger, ledger_path, read_ledger

    rows = read_ledger(ledger_path(config))
    if rows:
        shown = rows[-last:] if last else rows
        click.echo(f"\nledger {ledger_path(config)}" + (f" (last {len(shown)} of {len(rows)})" if last else ""))
        click.echo(format_ledger(shown))


class _PipelineGroup(click.Group):
    """Adds one command per registered stage, and turns PipelineError into a clean exit 2."""

    def list_commands(self, ctx):
        from pipeline.engine.registry import stage_names

        stages = list(stage_names())
        return stages + sorted(set(super().list_commands(ctx)) - set(stages))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        from pipeline.engine.registry import stage_names, stage_summary

        return _stage_command(name, stage_summary(name)) if name in stage_names() else None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            raise _UserError(str(exc)) from None
        except KeyboardInterrupt:
            raise _Interrupted("interrupted: the stage that was running left nothing that will be accepted; "
                               "earlier results are intact, and running the same command again continues") from None
        except OSError as exc:  # outside any stage: the work folder, the lock, the ledger, a config file
            if os.environ.get("KP_DEBUG") == "1" or exc.errno == errno.EPIPE:
                raise  # a closed pipe (kp status | head): click exits quietly
            raise _UserError(describe_os_error(exc)) from None


def _stage_command(name: str, doc: str) -> click.Command:
    @click.option("--force", is_flag=True, help="Rerun this stage even if it is up to date.")
    @_dry_run_option
    @_wait_option
    @_config_options
    def command(comp, extra_files, sets, force, dry_run):
        _run(comp, extra_files, sets, [name], force, dry_run=dry_run)

    command.__doc__ = f"{doc} Runs what it needs first, unless up to date."
    return click.command(name=name, short_help=doc)(command)


@click.group(cls=_PipelineGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kaggle-pipeline", prog_name="kp", message="%(prog)s %(version)s")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings, errors and each command's result: no progress.")
@click.option("-v", "--verbose", is_flag=True, help="Also TensorFlow's own log lines (kp hides them by default).")
@click.pass_context
def cli(ctx, quiet, verbose):
    """kp: a staged, cached Keras pipeline from a Kaggle competition's download to its submission.

    Each stage writes work/COMP/STAGE/ with a manifest; a stage whose config, code and upstream
    are unchanged is skipped, and one whose earlier result is in the run cache is restored. Stage
    commands are listed first. Shell completion: eval "$(_KP_COMPLETE=bash_source kp)" (zsh_source,
    fish_source for those shells).
    """
    from pipeline.core.console import VERBOSITY

    if quiet and verbose:
        raise click.UsageError("-q and -v ask for opposite things: give one")
    if quiet or verbose:  # the environment carries it to Ray workers; gone again when the command ends
        before = os.environ.get(VERBOSITY)
        os.environ[VERBOSITY] = "quiet" if quiet else "verbose"
        ctx.call_on_close(lambda: os.environ.pop(VERBOSITY) if before is None
                          else os.environ.__setitem__(VERBOSITY, before))
    if ctx.invoked_subcommand is None:  # bare `kp`: its help, as a successful answer
        click.echo(ctx.get_help())
        ctx.exit(0)


@cli.command("submit", short_help="submit: write the submission file; --upload sends it to Kaggle.")
@click.option("--force", is_flag=True, help="Rewrite the submission even if up to date (and upload it again).")
@_upload_options
@_as_configured_option
@_wait_option
@_config_options
def submit_command(comp, extra_files, sets, force, upload, message, as_configured):
    """submit: write the submission file exactly as sample_submission.csv asks; with --upload, send it to Kaggle
    and record its public score next to its validation score. Runs what it needs first, unless up to date;
    with --upload it trains nothing: a stage it reads that is stale stops it, saying how to bring it up to date.
    Given no settings, it acts on those of the last run in the work folder."""
    config, extra_files, sets = _settled(comp, extra_files, sets, as_configured)
    if upload:  # what ran (read here), then the credentials and the competition (asked of Kaggle)
        _check_uploaded_as_run(config, extra_files, sets)
        _check_can_upload(config)
    _run(comp, extra_files, sets, ["submit"], force, upload, message, config)


def _check_uploaded_as_run(config: ResolvedConfig, extra_files, sets) -> None:
    """`kp submit --upload` uploads what ran: every stage the submission reads is up to date (or restorable
    from the run cache), or one PipelineError naming them and the command that brings them up to date."""
    from pipeline.engine import last_run, runner
    from pipeline.engine.registry import all_stages
    from pipeline.engine.status import UP_TO_DATE, stage_statuses

    statuses = {s.name: s for s in stage_statuses(config)}
    reads = runner.plan(config, list(all_stages()["submit"].needs_for(config)))
    behind = [statuses[name] for name in reads if statuses[name].state != UP_TO_DATE and not statuses[name].restorable]
    if behind:
        why = "; ".join(f"{s.name} is {s.state} ({'; '.join(s.reasons)})" for s in behind)
        flags = last_run.described({"config": list(extra_files), "set": list(sets)})
        raise PipelineError(f"kp submit --upload uploads what ran and trains nothing: {why}; bring it up to date "
                            f"first: kp all --comp {config.comp} {flags}".rstrip())


@cli.command("all")
@click.option("--force", is_flag=True, help="Rerun every stage, up to date or not.")
@_upload_options
@_dry_run_option
@_wait_option
@_config_options
def all_command(comp, extra_files, sets, force, upload, message, dry_run):
    """Run every stage the competition lists, skipping the up-to-date ones."""
    _run(comp, extra_files, sets, None, force, upload, message, dry_run=dry_run)


@cli.command()
@click.option("--refresh", is_flag=True, help="First ask Kaggle for the scores of pending submissions.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: the ledger's rows.")
@_config_options
def ledger(comp, extra_files, sets, refresh, as_json):
    """Every upload: validation score, leaderboard score and their difference; writes ledger.png."""
    from pipeline.kaggle.ledger import ledger_path, read_ledger

    config = _load(comp, extra_files, sets)
    if not read_ledger(ledger_path(config)):
        if as_json:
            click.echo("[]")
            return
        click.echo(f"{ledger_path(config)}: no uploads yet (kp submit --comp {comp} --upload)")
        return
    from pipeline.kaggle import leaderboard

    if refresh:
        leaderboard.refresh(config, say=lambda line: click.echo(f"[{comp}] {line}", err=True))
    if as_json:
        click.echo(json.dumps(read_ledger(ledger_path(config)), indent=2))
        return
    _echo_ledger(config)
    click.echo(f"plot: {leaderboard.draw(config)}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: every stage with its metrics.")
@click.option("--verify", is_flag=True, help=(
    "Also read every output and compare it with the content digest its run recorded (exit status 1 if any differs)."))
@_as_configured_option
@_config_options
def status(comp, extra_files, sets, as_json, verify, as_configured):
    """Each stage: up to date / stale (with the reason) / missing, when it ran, its result."""
    from pipeline.core.runs import store_sizes
    from pipeline.engine.status import STALE, check_settings, damaged_outputs, format_table, stage_statuses
    from pipeline.kaggle.ledger import ledger_path, read_ledger

    config, _, _ = _settled(comp, extra_files, sets, as_configured, shallow=True)
    statuses = stage_statuses(config)
    check_settings(config, statuses, config.stage_names)
    damaged = damaged_outputs(config, statuses) if verify else {}
    for s in statuses:
        if s.name in damaged:
            s.state, s.reasons = STALE, damaged[s.name]
    if as_json:
        payload = {
            "competition": comp,
            "work_dir": str(config.work_dir),
            "stages": [s.as_dict() for s in statuses],
            "run_cache": {name: {"entries": n, "bytes": size} for name, (n, size) in store_sizes(config.work_dir).items()},
            "ledger": read_ledger(ledger_path(config)),
        }
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(f"{comp}: {config.work_dir}")
        _echo_table(format_table(statuses, config.get("submit.source")))
        _echo_run_cache(config)
        _echo_ledger(config, last=3)
    if damaged:
        click.echo(f"damaged outputs in {', '.join(damaged)}: kp STAGE --force --comp {comp} rewrites them "
                   "(and reruns what was built on them if they change)", err=True)
        sys.exit(1)


@cli.command()
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="A setting and the values to try (YAML, commas outside brackets split them); repeatable: every "
                   "combination is a trial.")
@click.option("--search", type=click.Path(exists=True, dir_okay=False), default=None, metavar="SPACE.yaml",
              help="Instead of a grid: an Optuna search over this space file ({key: {low, high, log, step} or "
                   "{choices: [...]}}).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="--search: the study's number of trials.")
@click.option("--seed", type=int, default=0, show_default=True, help="--search: the sampler's seed.")
@click.option("--objective", default=None, metavar="STAGE",
              help="The predicting stage whose validation score is compared (default: cv when listed, else the last "
                   "predicting stage).")
@click.option("--name", default=None, help="The sweep's folder under work/COMP/sweeps/ (default: objective + grid digest).")
@click.option("--prune/--no-prune", default=None,
              help="Stop a cv trial whose first folds are clearly worse than the best trial's (default: on for "
                   "--search, off for --grid, whose every cell is usually wanted).")
@click.option("--prune-after", type=click.IntRange(min=2), default=2, show_default=True,
              help="Folds a trial runs before it can be stopped.")
@click.option("--prune-margin", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="How much worse (relative; the error rate for accuracy) the mean of those folds must be, each "
                   "fold being worse too.")
@click.option("--json", "as_json", is_flag=True, help="Print the ended trials as JSON (as trials.jsonl holds them).")
@_wait_option
@_config_options
def sweep(comp, extra_files, sets, grid, search, trials, seed, objective, name, prune, prune_after, prune_margin,
          as_json):
    """A grid of settings or an Optuna search, each trial an ordinary run restored from the run cache where it ran before."""
    from pipeline.experiments.sweeps import finished, run_search, run_sweep, score_name_of
    from pipeline.experiments.trials import Pruning

    say = lambda line: click.echo(f"[{comp}] {line}", err=True)  # noqa: E731
    if bool(grid) == bool(search):
        raise PipelineError("kp sweep: give --grid KEY=V1,V2 (repeatable) or --search SPACE.yaml --trials N")
    pruning = Pruning(prune_after, prune_margin) if (prune if prune is not None else bool(search)) else None
    if search:
        if trials is None:
            raise PipelineError("kp sweep --search: say how many trials the study should hold (--trials N)")
        folder, done = run_search(comp, extra_files, sets, Path(search), trials, objective, name, seed, pruning, say)
    else:
        folder, done = run_sweep(comp, extra_files, sets, list(grid), objective, name, pruning, say)
    if as_json:
        click.echo(json.dumps(done, indent=2))
        return
    score = score_name_of(done)
    for trial in done:
        settings = " ".join(f"{key}={value}" for key, value in trial["overrides"].items())
        result = "  pruned" if trial.get("pruned") else f"{trial[score]:.5f}"
        click.echo(f"{trial['trial']:>3}  {result}  {settings}")
    stopped = len(done) - len(finished(done))
    click.echo(f"{len(done)} trials of {done[0]['objective']} ({score}" + (f"; {stopped} stopped early" if stopped else "")
               + f"); each trial's command: {folder}/trials.jsonl")


@cli.command()
@click.option("--stage", "stage_names", multiple=True, help="Only this predicting stage's runs (repeatable).")
@click.option("--sort", is_flag=True, help="Best score first (default: newest first).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable rows.")
@click.option("--best", is_flag=True, help="Print the best run's settings as an overlay for --config.")
@click.option("--apply", "apply_to", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="With --best: also write the overlay to FILE (a new file, or one an earlier --apply wrote).")
@click.option("--force", is_flag=True, help="With --apply: replace FILE even if kp did not write it.")
@click.option("--sweep", "sweep_name", default=None, metavar="NAME",
              help="Only the runs of this sweep's trials (work/COMP/sweeps/NAME/).")
@click.option("--plot", is_flag=True, help="With --sweep: draw the score against each setting it varied (sweep.png).")
@_as_configured_option
@_config_options
def runs(comp, extra_files, sets, stage_names, sort, as_json, best, apply_to, force, sweep_name, plot,
         as_configured):
    """Every stored run of the predicting stages: score, validation, the settings that differ from this config."""
    from pipeline.core.artifacts import SWEEPS_FOLDER, TRIALS_FILE
    from pipeline.core.cache import write_text_atomic
    from pipeline.core.ownership import check_replaceable, owned_text
    from pipeline.experiments.run_table import best_overlay, format_runs, ranked, score_key, stored_runs
    from pipeline.experiments.sweeps import draw_sweep, finished, read_trials

    config, _, _ = _settled(comp, extra_files, sets, as_configured, shallow=True)
    rows = stored_runs(config, tuple(stage_names) or None)
    if sweep_name is not None:
        folder = config.work_dir / SWEEPS_FOLDER / sweep_name
        if not (folder / TRIALS_FILE).is_file():
            found = sorted(p.parent.name for p in (config.work_dir / SWEEPS_FOLDER).glob(f"*/{TRIALS_FILE}"))
            raise PipelineError(f"--sweep {sweep_name}: no such sweep in {config.work_dir}; sweeps there: "
                                f"{', '.join(found) or 'none'}")
        trials = read_trials(folder)  # this sweep only: another's damaged file does not stop it
        keys = {(t["objective"], t["fingerprint"]) for t in finished(trials)}
        rows = [row for row in rows if (row["stage"], row["fingerprint"]) in keys]
        stopped = [str(t["trial"]) for t in trials if t.get("pruned")]
        if stopped:
            click.echo(f"trials stopped early (no result to list): {', '.join(stopped)}; why, and each trial's command: "
                       f"{config.work_dir / SWEEPS_FOLDER / sweep_name / TRIALS_FILE}", err=True)
        if plot:
            click.echo(f"wrote {draw_sweep(config.work_dir, sweep_name, trials)}", err=True)
    elif plot:
        raise PipelineError("--plot draws a sweep: name it with --sweep NAME")
    if sort:
        rows = ranked(config, rows)
    if best or apply_to:
        _, overlay = best_overlay(config, rows)
        if apply_to:  # checked before anything is printed: a refused write prints no overlay either
            check_replaceable(Path(apply_to), "write the overlay to a new file, or pass --force to replace it", force)
        click.echo(overlay, nl=False)
        if apply_to:
            write_text_atomic(Path(apply_to), owned_text(overlay, "kp runs --best --apply"))
            click.echo(f"wrote {apply_to} (use it with --config {apply_to})", err=True)
        return
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(format_runs(rows, score_key(config)))
    click.echo(f"{len(rows)} stored runs; * the current result of its stage", err=True)


@cli.command()
@click.option("--source", default=None, metavar="STAGE",
              help="The predicting stage whose models are packaged (default: submit.source).")
@click.option("--wheels", default=None, metavar="PYTHON",
              help="Also bundle the wheels that install kp offline for this CPython version (e.g. 3.11; about 0.5 GB "
                   "with TensorFlow for the CPU, which a kernel with its own TensorFlow does not install).")
@click.option("--force", is_flag=True, help="Replace the package's folders even where files were added or edited there.")
@_as_configured_option
@_wait_option
@_config_options
def package(comp, extra_files, sets, source, wheels, force, as_configured):
    """An inference bundle for a code competition's kernel (any predicting stage, a blend too): its models, each
    network once, kernel.py; the kernel timed here on the public test against kernel.time_limit_s."""
    from pipeline.engine import runner
    from pipeline.shipping.packaging import check_source, package as write_bundle

    config, _, _ = _settled(comp, extra_files, sets, as_configured)
    source = source or config.get("submit.source")
    check_source(config, source)
    runner.run(config, [source])
    folder, record = write_bundle(config, source, wheels, say=lambda line: click.echo(f"[{comp}] {line}", err=True),
                                  force=force)
    networks = len(record["networks"])
    click.echo(f"{folder}: {len(record['models'])} models of {source} ({record['validation']['kind']} "
               f"val_log_loss {record['validation']['val_log_loss']}), {networks} network file{'s' * (networks != 1)}, "
               f"{str(record['wheels']['files']) + ' wheels, ' if record['wheels'] else ''}"
               f"{record['size_bytes'] / 1e6:.1f} MB; run it: python {folder}/kernel.py "
               "(outside Kaggle: KP_KAGGLE_ROOT for /kaggle, or KP_COMPETITION_INPUT and KP_KERNEL_OUTPUT)")


@cli.group()
def kernel():
    """A code competition's kernel on Kaggle: push the bundle and the kernel, follow its run."""


@kernel.command("push")
@click.option("--source", default=None, metavar="STAGE",
              help="The predicting stage whose models the kernel runs (default: submit.source).")
@click.option("--force", is_flag=True, help="Replace the package's folders even where files were added or edited "
              "there; push even when the kernel's estimated time is over kernel.time_limit_s.")
@_as_configured_option
@_wait_option
@_config_options
def kernel_push(comp, extra_files, sets, source, force, as_configured):
    """Package the source (if its bundle is not current), push it as a dataset, push the kernel (no internet),
    wait for its run and download its output; a failed run ends with Kaggle's message and its log's end."""
    from pipeline.engine import runner
    from pipeline.shipping.code_submission import push
    from pipeline.shipping.packaging import check_source

    config, _, _ = _settled(comp, extra_files, sets, as_configured)
    source = source or config.get("submit.source")
    check_source(config, source)
    runner.run(config, [source])
    pushed = push(config, source, say=lambda line: click.echo(f"[{comp}] {line}", err=True), force=force)
    click.echo(f"{pushed['kernel']} version {pushed['version']}: {pushed['status']} (runs {source} "
               f"{pushed['fingerprint'][:12]}); outputs: {', '.join(pushed.get('outputs', [])) or '-'}")


@kernel.command("status")
@click.option("--wait", is_flag=True, help="Wait until the run ends (at most kernel.poll_timeout_s).")
@click.option("--force", is_flag=True, help="Replace the downloaded output even where files were added or edited there.")
@_config_options
def kernel_status(comp, extra_files, sets, wait, force):
    """How the last pushed kernel's run stands (its output downloaded once it has ended)."""
    from pipeline.shipping.code_submission import follow, read_push

    config = _load(comp, extra_files, sets)
    pushed = read_push(config)
    if pushed is None:
        raise PipelineError(f"{comp}: no kernel pushed yet (kp kernel push --comp {comp})")
    pushed = follow(config, pushed, wait, say=lambda line: click.echo(f"[{comp}] {line}", err=True), force=force)
    click.echo(f"{pushed['kernel']} version {pushed['version']}: {pushed['status']} (runs {pushed['source']} "
               f"{pushed['fingerprint'][:12]}, pushed {pushed['pushed']})")


@cli.command("lr-find")
@click.option("--stage", type=click.Choice(RECIPE_NAMES), default="finetune", show_default=True,
              help="Whose training the range test imitates: its recipe's model, rows, optimizer and batch size.")
@click.option("--steps", type=click.IntRange(10, 10000), default=200, show_default=True, help="Batches at most.")
@click.option("--apply", is_flag=True, help="Also write the suggestion as a config overlay to pass with --config.")
@_wait_option
@_config_options
def lr_find(comp, extra_files, sets, stage, steps, apply):
    """Learning-rate range test on a copy of the stage's model: suggested rates, lr_find.png."""
    from pipeline.core.artifacts import LR_FIND_DIR
    from pipeline.engine import runner
    from pipeline.training.lr_find import find_for_stage

    config = _load(comp, extra_files, sets)
    view, inputs = runner.stage_inputs(config, stage)
    record = find_for_stage(view, stage, inputs, config.work_dir / LR_FIND_DIR / stage, steps, apply,
                            say=lambda line: click.echo(f"[{comp}] {line}", err=True))
    s = record["suggestions"]
    click.echo(f"{stage}: {record['batches']} batches ({'diverged' if record['diverged'] else 'did not diverge'}); "
               f"steepest fall at lr {s['steepest']:.3g}, minimum / 10 = {s['minimum_over_10']:.3g} "
               f"(configured: {record['current_lr']:.3g})")
    click.echo(f"plot: {record['plot']}")
    if record["overlay"]:
        click.echo(f"overlay: {record['overlay']} (use: --config {record['overlay']})")


@cli.command()
@click.option("--augmented", is_flag=True, help="Each image beside its versions in augment's first passes.")
@click.option("--per-class", type=click.IntRange(1, 50), default=4, show_default=True, help="Images of each class.")
@_config_options
def show(comp, extra_files, sets, augmented, per_class):
    """A grid of training images with their labels (and augmented versions), written to a PNG."""
    from pipeline.engine import runner
    from pipeline.evaluation.gallery import show_training_images

    config = _load(comp, extra_files, sets)
    runner.run(config, ["download"])
    path, _ = show_training_images(config, per_class, augmented, say=lambda line: click.echo(f"[{comp}] {line}", err=True))
    click.echo(str(path))


@cli.command()
@_as_configured_option
@_config_options
def report(comp, extra_files, sets, as_configured):
    """One self-contained HTML page of the run: stages, scores, plots, ladder, ledger."""
    from pipeline.experiments.report import build_report

    config, _, _ = _settled(comp, extra_files, sets, as_configured, shallow=True)
    click.echo(str(build_report(config)))


@cli.command()
@click.option("--write", is_flag=True, help=(
    "Derive the table from the installed Keras again (builds every network once: about a minute) and commit it."))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: one object per network.")
def backbones(write, as_json):
    """Every keras.applications network precompute.backbone takes: preprocessing, sizes, feature width."""
    from dataclasses import asdict

    from pipeline.core.console import aligned
    from pipeline.models.applications import TABLE_FILE, applications, derive_applications, write_table

    if write:
        write_table(derive_applications())
        click.echo(f"wrote {TABLE_FILE}")
    if as_json:
        click.echo(json.dumps([asdict(a) for a in applications().values()], indent=2))
        return
    rows = [("backbone", "preprocessing", "size", "min size", "alpha", "features")]
    rows += [(a.name, a.preprocessing, str(a.default_size), str(a.min_size), "yes" if a.alpha else "",
              f"{a.width:,}") for a in applications().values()]
    click.echo(aligned(rows))
    click.echo("\nalso: none (pixels, for from-scratch models), file (precompute.weights: a whole .keras model); "
               "any case works (vgg16 = VGG16); features: the channels of the last feature map at alpha 1.0, which "
               "cut: pool averages over the image into one row of that width")


@cli.command("config")
@click.argument("keys", nargs=-1, metavar="[KEY]...")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: each key's value, source and description.")
@click.option("--defaults", "write_defaults", is_flag=True,
              help="Write configs/defaults.yaml and the key table of docs/configuration.md from the code.")
@_config_options
def show_config(comp, extra_files, sets, keys, as_json, write_defaults):
    """Print the merged config, each value with the file (or --set) that set it; given KEYs (`split`,
    `finetune.lr`), only those, each with what it does."""
    from pipeline.engine.config import did_you_mean, project_root, source_of
    from pipeline.engine.config_reference import described_keys

    if write_defaults:
        from pipeline.engine.config_reference import write_reference

        changed = write_reference(project_root())
        click.echo("\n".join(f"wrote {path}" for path in changed) or "configs/defaults.yaml and "
                   "docs/configuration.md already match the code")
        return
    config = _load(comp, extra_files, sets)
    rows = described_keys(config)
    if keys:
        names = [key for key, _, _ in rows]
        for asked in keys:
            if not any(name == asked or name.startswith(asked + ".") for name in names):
                known = [*sorted({name.split(".")[0] for name in names}), *names]
                raise PipelineError(f"kp config {asked}: no such key or section{did_you_mean(asked, known)}")
        rows = [row for row in rows if any(row[0] == asked or row[0].startswith(asked + ".") for asked in keys)]
    if as_json:
        click.echo(json.dumps([{"key": key, "value": value, "source": source_of(key, config.provenance),
                                "description": description} for key, value, description in rows], indent=2))
        return
    for key, value, description in rows:
        click.echo(f"{key} = {json.dumps(value)}    # {source_of(key, config.provenance)}")
        if keys and description:
            click.echo(f"    {description}")


@cli.command()
@click.option("--stage", "stage_names", multiple=True, help="Only this stage's outputs (repeatable).")
@click.option("--keep-last", type=click.IntRange(min=0), default=None, metavar="N",
              help="Keep each stage's current result and its N most recently used stored runs; delete older ones.")
@click.option("--yes", "-y", is_flag=True, help="Delete without asking (needed where there is no terminal to ask on).")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@_wait_option
@_config_options
def clean(comp, extra_files, sets, stage_names, keep_last, yes, dry_run):
    """Delete a competition's outputs (work/COMP), only the given stages', or only old stored runs: it prints
    what it would delete with sizes, then asks (on a terminal) or needs --yes."""
    from pipeline.core.cache import competition_lock, sweep_partial
    from pipeline.core.runs import folder_size, prune_stage, remove_stage

    config = _load(comp, extra_files, sets)
    work = config.work_dir
    for name in stage_names:
        if name not in config.stage_names:
            raise PipelineError(f"--stage {name}: not a stage of {comp!r}; its stages: {config.stage_names}")
    if not work.exists():
        click.echo(f"{work}: nothing to clean")
        return
    with competition_lock(work, wait=config.get("cache.wait")):
        sweep_partial(work)

        def plan(dry: bool) -> list[tuple[Path, int]]:
            if keep_last is not None:
                return [(entry.path, entry.size) for name in (stage_names or config.stage_names)
                        for entry in prune_stage(work, name, keep_last, dry_run=dry)]
            if stage_names:
                return [(path, 0 if path.is_symlink() else folder_size(path)) for name in stage_names
                        for path in remove_stage(work, name, dry_run=dry)]
            return [(path, folder_size(path) if path.is_dir() and not path.is_symlink() else path.lstat().st_size)
                    for path in sorted(work.iterdir()) if not path.name.startswith(".")]  # not kp's lock and marker

        doomed = plan(dry=True)
        if not doomed:
            click.echo(f"{work}: nothing to clean")
            return
        whole = keep_last is None and not stage_names
        click.echo(f"kp clean would delete{' ' + str(work) + ', that is' if whole else ''}:")
        for path, size in sorted(doomed, key=lambda item: -item[1]):
            click.echo(f"  {_megabytes(size):>12}  {path.relative_to(work) if path != work else path}")
        click.echo(f"  {_megabytes(sum(size for _, size in doomed)):>12}  in all")
        if dry_run:
            return
        if not yes:
            if not sys.stdin.isatty():
                raise PipelineError("kp clean: no terminal to ask on, so nothing was deleted; pass --yes to delete "
                                    "the above")
            if not click.confirm("Delete these?", default=False):
                click.echo("nothing deleted")
                return
        if whole:
            shutil.rmtree(work, ignore_errors=True)
            click.echo(f"removed {work}")
            return
        plan(dry=False)
        click.echo(f"removed {len(doomed)} entries ({_megabytes(sum(size for _, size in doomed))})")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _echo_run_cache(config: ResolvedConfig) -> None:
    from pipeline.core.runs import store_sizes

    sizes = store_sizes(config.work_dir)
    if sizes:
        parts = [f"{name} {n} ({_megabytes(size)})" for name, (n, size) in sizes.items()]
        total = sum(size for _, size in sizes.values())
        click.echo(f"\nrun cache {config.work_dir / '_runs'}: {_megabytes(total)}; stored results: " + ", ".join(parts)
                   + f"  (kp clean --comp {config.comp} --keep-last N)")


def main() -> None:
    from pipeline.cli.terminal import quiet_tensorflow

    if not {"-v", "--verbose"} & set(sys.argv[1:2]):  # `kp -v ...` keeps TensorFlow's own lines
        quiet_tensorflow()
    cli(prog_name="kp")


if __name__ == "__main__":
    main()
