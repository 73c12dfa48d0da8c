"""Large arrays on disk: `.npy` files written chunk by chunk and read back memory-mapped.

Cached features (State Farm's 79,726 test images at 7x7x512 are 4 GB in float16) never have to
fit in memory: `ChunkedArrayWriter` fills an `open_memmap` file in order, and `load_array` maps
it read-only. The writer is used inside a stage's temporary output folder, so a file cut short
by a crash is never accepted; `complete` tells whether every row was written.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from pipeline.core.errors import PipelineError


class ChunkedArrayWriter:
    """Write an (n, *shape) array in consecutive chunks, without holding it in memory."""

    def __init__(self, path: Path, n_rows: int, row_shape: tuple[int, ...], dtype) -> None:
        self.path = Path(path)
        self.n_rows = n_rows
        self.written = 0
        self._array = open_memmap(self.path, mode="w+", dtype=np.dtype(dtype), shape=(n_rows, *row_shape))
        reserve_space(self.path)

    def append(self, chunk: np.ndarray) -> None:
        end = self.written + len(chunk)
        if end > self.n_rows:
            raise ValueError(f"{self.path}: {end} rows written, but the array has {self.n_rows}")
        if chunk.shape[1:] != self._array.shape[1:]:
            raise ValueError(f"{self.path}: chunk rows have shape {chunk.shape[1:]}, expected {self._array.shape[1:]}")
        self._array[self.written:end] = chunk
        self.written = end

    @property
    def complete(self) -> bool:
        return self.written == self.n_rows

    def close(self) -> None:
        if not self.complete:
            raise ValueError(f"{self.path}: closed after {self.written} of {self.n_rows} rows")
        self._array.flush()
        del self._array

    def __enter__(self) -> "ChunkedArrayWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def reserve_space(path: Path) -> None:
    """Allocate every block of a new memory-mapped file before writing into it.

    `open_memmap` makes a sparse file: writing into it on a full disk kills the process with SIGBUS
    and no message. Allocating first turns that into an ordinary OSError (ENOSPC) naming the file,
    before anything is written; the half-made file is removed.
    """
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def load_array(path: Path, in_memory: bool = False) -> np.ndarray:
    """A cached array, memory-mapped read-only: memory does not grow with its size.

    Args:
        path: a `.npy` file a stage wrote.
        in_memory: read it whole instead (small arrays: predictions).

    Raises:
        PipelineError: the file is missing, its header is damaged, or it is shorter than its header
            says (damaged outside the pipeline); the message names it and how to rewrite it.
    """
    rewrite = "rerun the stage that wrote it (kp STAGE --force; kp status --verify finds every damaged output)"
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            data_start = handle.tell()
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing; {rewrite}") from None
    except (ValueError, EOFError, SyntaxError) as exc:  # numpy's words: "the magic string is not correct", ...
        raise PipelineError(f"{path}: not a readable .npy array, its header is damaged ({exc}); {rewrite}") from None
    if dtype.hasobject:
        raise PipelineError(f"{path}: holds Python objects, which kp never writes and will not unpickle; {rewrite}")
    expected = data_start + int(np.prod(shape)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual < expected:
        raise PipelineError(f"{path}: truncated: its header says {shape[0] if shape else 1} rows of {tuple(shape[1:])} "
                            f"{dtype} ({expected:,} bytes), the file holds {actual:,}; {rewrite}")
    return np.load(path) if in_memory else np.load(path, mmap_mode="r")
