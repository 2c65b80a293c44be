"""Where NDJSON goes: stdout and optionally a file, written in batches, never a partial line.

A reader that goes away (``| head``) is not an error: stdout is marked closed, the file (if
any) keeps receiving every line, and the runner stops launching probes when nothing is left to
write to.
"""

from __future__ import annotations

import errno
import os
import select
import sys
from typing import Any, BinaryIO

from scanner.core.results import encode
from scanner.errors import InputError

FLUSH_BYTES = 1 << 16


class NdjsonOutput:
    def __init__(self, path: str | None = None, stdout: bool = True, fd: int | None = None) -> None:
        self._fd: int | None = fd if fd is not None else (sys.stdout.fileno() if stdout else None)
        self._is_stdout = fd is None
        # the lines go to the file only (-o FILE at a terminal): the command says so on stderr
        self.file_only = path if path is not None and self._fd is None else None
        self._file: BinaryIO | None = None
        if path is not None:
            try:
                self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
            except OSError as e:
                raise InputError(f"cannot write output file {path!r}: {e.strerror}") from None
        self._buf: list[bytes] = []
        self._size = 0
        self.stdout_closed = False

    @property
    def dead(self) -> bool:
        """True when no destination is left (stdout closed and no file)."""
        return self._file is None and (self._fd is None or self.stdout_closed)

    def record(self, rec: dict[str, Any]) -> None:
        self.write(encode(rec))

    def write(self, data: bytes) -> None:
        """Queue complete lines (``data`` must end with a newline)."""
        self._buf.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        if self._file is not None:
            self._file.write(data)
            self._file.flush()
        if self._fd is not None and not self.stdout_closed:
            self._write_fd(data)

    def _write_fd(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)  # type: ignore[arg-type]
            except InterruptedError:
                continue
            except BlockingIOError:
                select.select([], [self._fd], [], 1.0)
                continue
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.EBADF, errno.ECONNRESET):
                    self.stdout_closed = True
                    if self._is_stdout:
                        _silence_stdout()
                    return
                raise
            view = view[n:]

    def write_raw(self, data: bytes) -> None:
        """Complete lines produced elsewhere (a shard process), written through at once."""
        self.flush()
        if self._file is not None:
            self._file.write(data)
        if self._fd is not None and not self.stdout_closed:
            self._write_fd(data)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _silence_stdout() -> None:
    # Point fd 1 at /dev/null so nothing later (the interpreter's own flush) hits EPIPE.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:
        pass
