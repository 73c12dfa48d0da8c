"""What `kp` keeps off the terminal: lines from TensorFlow that look like errors and are not.

Each is silenced exactly, by its text, because its cause is outside the project:
- `E0000 ... NodeDef mentions attribute use_unbounded_threadpool which is not in the op
  definition: Op<name=MapDataset ...>`: with op determinism on (`training.deterministic`),
  TensorFlow 2.21's tf.data rewrite that makes a parallel map sequential copies the map's
  `use_unbounded_threadpool` attribute onto a `MapDataset`, which has none; the attribute is
  ignored, as the line itself says. Printed by TensorFlow's C++ runtime once per `fit` on arrays,
  so it is filtered out of file descriptor 2.
- absl's `WARNING: All log messages before absl::InitializeLog() is called are written to STDERR`,
  which precedes the first such line.
- `... triggered tf.function retracing`: Keras traces each model's own predict function, and
  TensorFlow counts traces per function body across model instances, so an ensemble's fifth
  member "retraces" by design (each member is a new model; nothing is traced twice for one model).
  A Python logging filter on the `tensorflow` logger.
- `I0000 ... oneDNN custom operations are on ...`: TensorFlow's notice at every start (its INFO
  lines are also off through TF_CPP_MIN_LOG_LEVEL=1 unless the environment sets it, which
  TensorFlow 2.21 does not apply to this one).
- `W0000 ... Error occurred when finalizing GeneratorDataset iterator: FAILED_PRECONDITION`: a
  tf.data generator's iterator destroyed after its Python side (at exit, after Ctrl-C, after
  `kp lr-find`'s short run); harmless, and said as an error.
- Anything TensorFlow's destructors print once kp has finished: at exit, file descriptor 2 goes
  to /dev/null after the last of kp's own lines has gone out.

`kp -v` keeps all of it (`quiet_tensorflow` is not called).
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading

NATIVE_NOISE = re.compile(rb"^(?:E\d{4} [^\n]*NodeDef mentions attribute use_unbounded_threadpool [^\n]*"
                          rb"|I\d{4} [^\n]*oneDNN custom operations are on[^\n]*"
                          rb"|W\d{4} [^\n]*Error occurred when finalizing GeneratorDataset iterator[^\n]*"
                          rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)"
                          rb"\n", re.M)
NATIVE_LINE_START = re.compile(rb"(?:^|\n)[EWIF][^\n]*\Z")  # the start of a line that may be a native log line
RETRACING = "triggered tf.function retracing"


class _DropRetracing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return RETRACING not in record.getMessage()


def quiet_tensorflow() -> None:
    """Silence the lines above for this process (and its children's INFO lines). Call once, before
    TensorFlow is imported; a no-op for the file descriptor when stderr is not a real file."""
    from pipeline.core.console import remember_terminal

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.getLogger("tensorflow").addFilter(_DropRetracing())
    try:
        sys.stderr.flush()
        remember_terminal(os.isatty(2))  # the pipe below is none: progress bars ask about the real stderr
        original = os.dup(2)
    except (OSError, ValueError):
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_forward, args=(read_end, original), daemon=True, name="kp-stderr")
    pump.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        # closes the pipe's last write end (the pump forwards what is left, then ends); what TensorFlow's own
        # destructors print after this, as the process exits, goes nowhere instead of to the terminal
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        pump.join(timeout=5)

    atexit.register(restore)


def _forward(read_end: int, original: int) -> None:
    """Copy the pipe to the real stderr as it arrives, less the noise; a partial line that may be the
    start of a native log line waits for its end, anything else (a progress bar's redraw) goes at once."""
    pending = b""
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        pending = NATIVE_NOISE.sub(b"", pending + chunk)
        cut = len(pending)
        waiting = NATIVE_LINE_START.search(pending)
        if waiting:
            cut = waiting.start() + (1 if pending[waiting.start():waiting.start() + 1] == b"\n" else 0)
        if cut:
            os.write(original, pending[:cut])
        pending = pending[cut:]
    if pending:
        os.write(original, NATIVE_NOISE.sub(b"", pending))
    os.close(read_end)
