"""How kp talks on the terminal: log lines beside progress bars, bars only on a terminal, -q and -v.

- `say(line)` prints one line on stderr through tqdm's own `tqdm.write`, which clears the bars
  drawn at that moment and draws them again below the line: a log line never lands on a bar's line.
  Inside `speaking_for(label)` (a stage's run) every line starts with `[label]` once.
- `progress(total, desc, unit)` is a tqdm bar on a terminal, redrawn in place and gone once it
  closes (`leave=False`: no copies in the scrollback; the stage's `done` line says how it went).
  Where stderr is not a terminal (a log file, CI) it draws no bar: a plain line when it starts, one
  every 30 s while it runs, and one when it ends.
- `aligned(rows)` lays rows out in columns, as every table kp prints (status, runs, ledger, backbones).
- `KP_VERBOSITY` (`kp -q` sets `quiet`, `kp -v` sets `verbose`; the environment carries it to Ray
  workers): quiet keeps warnings, errors and each command's result and drops the progress lines and
  bars; verbose also lets TensorFlow's own log lines through (`pipeline.cli.terminal`).
"""
from __future__ import annotations

import contextlib
import sys
import time
from contextvars import ContextVar
from typing import Iterator

VERBOSITY = "KP_VERBOSITY"  # quiet | verbose | unset (normal)
PLAIN_EVERY_S = 30.0  # a plain progress line this often while a long pass runs without a terminal
_LABEL: ContextVar[str] = ContextVar("kp_label", default="")


def verbosity() -> str:
    """`quiet`, `verbose` or `normal`, as `kp -q` / `-v` set it."""
    import os

    value = os.environ.get(VERBOSITY, "normal")
    return value if value in ("quiet", "verbose") else "normal"


_TERMINAL: list[bool] = []  # what stderr was before `kp` put a filter between it and the terminal


def remember_terminal(is_terminal: bool) -> None:
    """Say whether stderr is a terminal, before it is replaced by a pipe that filters it
    (`pipeline.cli.terminal.quiet_tensorflow`): `interactive` answers for the real one."""
    _TERMINAL[:] = [is_terminal]


def interactive() -> bool:
    """Whether stderr is a terminal (bars are redrawn in place there)."""
    if _TERMINAL:
        return _TERMINAL[0]
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def speaking_for(label: str) -> Iterator[None]:
    """Within the block, `say`'s lines start with `[label]` (a competition, or COMP/VARIANT)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def _labelled(text: str) -> str:
    """`text` starting with `[label]` inside `speaking_for(label)` (once: a text that has it keeps it)."""
    label = _LABEL.get()
    return text if not label or text.startswith(f"[{label}") else f"[{label}] {text}"


def say(message: str, warning: bool = False) -> None:
    """Print one line on stderr beside any progress bar (dropped under `kp -q` unless a warning)."""
    from tqdm import tqdm

    if verbosity() == "quiet" and not warning:
        return
    tqdm.write(_labelled(message), file=sys.stderr)
    sys.stderr.flush()


def aligned(rows: list) -> str:
    """`rows` (tuples of strings, the header first) as text in columns two spaces apart, each column as
    wide as its widest cell but the last, which runs on; no line ends in spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]).rstrip()
                     for row in rows)


class PlainProgress:
    """A progress display without a bar (stderr is no terminal): a line when it starts, one every
    `PLAIN_EVERY_S` while it runs, and one when it ends; tqdm's `update`, `reset`, `set_postfix_str`, `close`."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.started = self.said = time.monotonic()
        self.postfix = ""
        say(f"{desc}: {total:,} {unit}")

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.said >= PLAIN_EVERY_S and self.n < self.total:
            self.said = time.monotonic()
            say(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({time.monotonic() - self.started:.0f} s)"
                + (f", {self.postfix}" if self.postfix else ""))

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def reset(self, total: int) -> None:
        """Count again from 0 to `total` (what is left to do, once the reused part is known)."""
        self.total, self.n, self.started = total, 0, time.monotonic()

    def close(self) -> None:
        if self.total:
            say(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} in {time.monotonic() - self.started:.1f} s"
                + (f", {self.postfix}" if self.postfix else ""))
        self.total = 0

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "img"):
    """A progress display of `total` steps: a tqdm bar on a terminal, `PlainProgress` lines elsewhere, nothing
    under `kp -q` (a disabled bar). Use it as a context manager, with `update(n)`."""
    from tqdm import tqdm

    desc = _labelled(desc)
    if verbosity() == "quiet":
        return tqdm(total=total, disable=True)
    if not interactive():
        return PlainProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0.5, dynamic_ncols=True, leave=False)
