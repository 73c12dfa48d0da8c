"""What a stage is: its declaration (`Stage`), its settings base class, and what it is handed at run time.

A stage module in `stages/` defines a `Settings` model (its config section), a `run(ctx)` function
(the recipe) and a module-level `STAGE = Stage(...)` that ties them together with the stage's
upstream stages and the config keys it reads. The cache fingerprints exactly those declarations.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are an error, and a loaded config is read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Stage:
    """A stage's declaration.

    name: the command (`kp NAME`) and the work folder (`work/COMP/NAME/`).
    run: the recipe; takes a `StageContext`, writes under `ctx.out`, returns its metrics (a dict
        of JSON values), which land in the manifest and in `kp status --json`.
    settings: the pydantic model of its config section.
    section: the config section it owns (default: its name).
    needs: upstream stages whose outputs it reads.
    reads: dotted config keys outside its own section that change its output.
    version: bump when the code changes what the stage writes; it invalidates the cached outputs.
    headline: turns its metrics into the short text `kp status` shows.
    source_stamp: extra fingerprint inputs read from outside the config (e.g. a source archive's
        size and modification time), so that replacing an input file makes the stage stale.
    extra_needs: upstream stages chosen by the config (submit reads the stage `submit.source` names).
    """

    name: str
    run: Callable[["StageContext"], dict[str, Any]]
    settings: type[StrictModel]
    section: str = ""
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    version: int = 1
    headline: Callable[[dict[str, Any]], str] = lambda metrics: ""
    source_stamp: Callable[[Any], dict[str, Any]] | None = None
    extra_needs: Callable[[Any], tuple[str, ...]] | None = None

    def needs_for(self, config) -> tuple[str, ...]:
        """Upstream stages under this config: `needs`, then whatever `extra_needs` adds."""
        extra = self.extra_needs(config) if self.extra_needs else ()
        return self.needs + tuple(name for name in extra if name not in self.needs)

    def __post_init__(self):
        if not self.section:
            object.__setattr__(self, "section", self.name)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every config key whose value goes into the fingerprint: its section, then `reads`."""
        return (self.section, *self.reads)


@dataclass
class StageContext:
    """What a running stage gets: its settings, the whole config, where to read and where to write.

    out: a fresh temporary folder; everything the stage writes goes here. It becomes
        `work/COMP/STAGE/` only once `run` returns, so a crash never leaves an accepted artifact.
    inputs: the finished output folder of each upstream stage, by name.
    cache_dir: a per-competition folder that survives reruns (downloaded archives live here).
    config_fingerprint: this stage's fingerprint (submissions carry it).
    fingerprint_inputs: what that fingerprint hashes (config values, upstream fingerprints).
    """

    comp: str
    config: Any  # pipeline.config.ResolvedConfig (not imported here to keep this module light)
    settings: Any
    out: Path
    inputs: dict[str, Path]
    cache_dir: Path
    config_fingerprint: str = ""
    fingerprint_inputs: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(f"[{self.comp}] {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        """Print a warning and keep it for the manifest (shown again by `kp status --json`)."""
        self.warnings.append(message)
        print(f"[{self.comp}] WARNING: {message}", file=sys.stderr, flush=True)

    def input(self, stage: str) -> Path:
        return self.inputs[stage]

    def progress(self, total: int, desc: str):
        """A progress bar on stderr (redrawn in place on a terminal, a line every 30 s in a log)."""
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        return tqdm(total=total, desc=f"[{self.comp}] {desc}", unit="img", file=sys.stderr,
                    mininterval=0.5 if interactive else 30, dynamic_ncols=interactive)
