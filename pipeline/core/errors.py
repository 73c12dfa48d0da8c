"""The one exception type a user sees: a clear, one-line (or few-line) message, never a traceback."""


class PipelineError(Exception):
    """Bad input or a failed precondition, worded for the user.

    The message names the file, key or row at fault and what was expected. The CLI prints it
    and exits with status 2; it never carries a traceback to the terminal.
    """
