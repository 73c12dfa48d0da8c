"""Reading back the files the pipeline and Kaggle write: text, JSON and CSV tables, each parse or
type error turned into one message naming the file and the line, row or key.

Configs, ledgers, run records, the CSVs that come out of a competition's archive and the tables
stages hand each other all come through here, so a file that is not UTF-8, a row with a field too
many, or valid JSON of the wrong shape ends as a `PipelineError` (exit status 2), never as a
pandas, json or codec traceback.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable

from pipeline.core.errors import PipelineError


def read_text(path: Path) -> str:
    """The file's text, which must be UTF-8.

    Raises:
        PipelineError: it is not UTF-8 (names the line and the byte), or it is missing.
    """
    data = _read_bytes(path)
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's UTF-8 CSVs) is not part of the text
    except UnicodeDecodeError:
        raise PipelineError(_not_utf8(path, data)) from None


def read_json(path: Path, kind: type = dict) -> Any:
    """The JSON value in `path`, which must be of `kind` (an object by default).

    Raises:
        PipelineError: not UTF-8, not JSON (names line and column), or JSON of another kind.
    """
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    if not isinstance(value, kind):
        raise PipelineError(f"{path}: expected a JSON {_kind_name(kind)}, found {_kind_name(type(value))}")
    return value


def read_table(path: Path, required: Iterable[str] = (), **read_csv_args):
    """A CSV file as a pandas DataFrame, read as pandas' `read_csv(path, **read_csv_args)` would.

    Args:
        path: the file.
        required: columns its header must hold (an error lists what it holds instead).
        read_csv_args: passed to `pandas.read_csv` (dtype, keep_default_na, skiprows...).

    Raises:
        PipelineError: the file is missing, empty, not UTF-8, lacks a required column, or a row has
            more fields than the header (names the line).
    """
    import pandas as pd

    required = list(required)
    if required:
        header = csv_header(path)
        missing = [c for c in required if c not in header]
        if missing:
            shown = ",".join(header[:12]) + (",..." if len(header) > 12 else "")
            raise PipelineError(f"{path}: wrong header: expected columns {','.join(required)}; "
                                f"found {shown or '(empty file)'}")
    try:
        return pd.read_csv(path, encoding="utf-8", **read_csv_args)
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing") from None
    except UnicodeDecodeError:
        raise PipelineError(_not_utf8(path, _read_bytes(path))) from None
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{path}: empty (expected a header line and rows)") from None
    except pd.errors.ParserError as exc:
        raise PipelineError(f"{path}: {_parser_problem(str(exc))}") from None


def csv_header(path: Path) -> list[str]:
    """The first row of a CSV file ([] when it is empty), read without reading the rest."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle), [])
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing") from None
    except UnicodeDecodeError as exc:  # in the first chunk decoded, which begins the file: its bytes are exc.object
        raise PipelineError(_not_utf8(path, exc.object)) from None


def read_rows(path: Path, columns: list[str], numeric: Iterable[str] = ()) -> list[dict[str, str]]:
    """A small CSV the pipeline keeps (the ledger) as dicts, every row checked.

    Args:
        path: the file.
        columns: the columns each row must have, in any order (extra columns are kept).
        numeric: columns that must hold a number when they are not empty.

    Raises:
        PipelineError: not UTF-8, a column missing from the header, a row with too few or too many
            fields, or a non-numeric value where a number belongs; the message names the line.
    """
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)} (expected {','.join(columns)})")
    rows = []
    for row in reader:
        line = reader.line_num
        if None in row or any(value is None for value in row.values()):
            fields = len(header) + len(row.get(None, [])) - sum(value is None for value in row.values())
            raise PipelineError(f"{path}: line {line} has {fields} fields, the header has {len(header)}")
        for column in numeric:
            value = row.get(column, "")
            if value != "" and not _is_number(value):
                raise PipelineError(f"{path}: line {line}, column {column}: {value!r} is not a number")
        rows.append(row)
    return rows


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing") from None
    except IsADirectoryError:
        raise PipelineError(f"{path}: a folder where a file is expected") from None


def _not_utf8(path: Path, data: bytes) -> str:
    """Where `data` (the file's bytes, from its start) first stops being UTF-8, in words. Found here
    rather than taken from a caller's exception, whose offset may count from a buffer of pandas'."""
    try:
        data.decode("utf-8-sig")
        return f"{path}: not UTF-8 text"
    except UnicodeDecodeError as exc:
        at = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
    line = data[:at].count(b"\n") + 1
    return (f"{path}: not UTF-8 text (byte 0x{data[at]:02x} on line {line}); save it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)")


def _parser_problem(message: str) -> str:
    """pandas' 'Error tokenizing data. C error: Expected 785 fields in line 3, saw 786' in plain words."""
    match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
    if match:
        expected, line, saw = match.groups()
        return f"line {line} has {saw} fields, the header has {expected}"
    return f"cannot be read as CSV ({message.strip()})"


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _kind_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(kind, kind.__name__)
