"""Atomic file writes: a half-written file never replaces a good one, and a failed write is one
line naming the file (a WriteError), never a library's raw error.

Temporary files sit beside their target as `.<name>.<random>.tmp` (folders as `.tmp-<random>`)
and are created with the usual permissions (the umask decides, as for any other file; mkstemp
would make them 0600). A killed process leaves only those names, which `remove_leftovers`
recognises on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from modules.errors import RunError

# what writers leave behind: ours (8 hex digits) and tempfile's (8 of [a-z0-9_])
_LEFTOVER_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_LEFTOVER_DIR = re.compile(r"^\.tmp-[a-z0-9_]{8}$")
# safetensors writes from Rust and reports the OS error only in its message
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")

_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


class WriteError(RunError, OSError):
    """A file could not be written; whatever was there before is unchanged.

    Also an OSError, which is what it is, so callers that handle failed writes keep doing so.
    """

    def __init__(self, path: Path, error: OSError) -> None:
        reason = error.strerror or str(error) or type(error).__name__
        if error.errno in _FULL:
            fix = "free space on that disk (or choose another folder) and run again"
        elif error.errno in _DENIED:
            fix = "make the folder writable (or choose another) and run again"
        else:
            fix = "check the disk and run again"
        super().__init__(f"cannot write {path}: {reason}; nothing was replaced; {fix}")
        self.path = path


def os_error_of(error: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, if that is what `error` is."""
    if isinstance(error, OSError):
        return error
    found = _RUST_OS_ERROR.search(str(error))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


class HashingFile:
    """A binary file handle that hashes what passes through it and remembers the OS error a
    writer swallowed (torch.save reports a failed write as an unrelated RuntimeError)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._sha256 = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            written = self._handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise
        view = memoryview(data).cast("B")
        self._sha256.update(view[:written])
        self.size += written
        return written

    def flush(self) -> None:
        self._handle.flush()

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()


@contextlib.contextmanager
def written_file(path: Path, *, shown: Path | None = None) -> Iterator[HashingFile]:
    """Write `path` (created or truncated) through a HashingFile and fsync it; any failure to
    write becomes a WriteError naming `shown` (default `path`)."""
    try:
        with open(path, "wb") as raw:
            handle = HashingFile(raw)
            try:
                yield handle
                raw.flush()
                os.fsync(raw.fileno())
            except BaseException as error:
                cause = handle.error or os_error_of(error)
                if cause is None:
                    raise
                raise WriteError(shown or path, cause) from error
    except WriteError:
        raise
    except OSError as error:  # opening or closing failed
        raise WriteError(shown or path, error) from error


def _temp_file(target: Path) -> Path:
    """Create an empty `.<name>.<random>.tmp` beside `target`, permissions from the umask."""
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def temp_dir(parent: Path) -> Path:
    """Create an empty `.tmp-<random>` folder in `parent`, permissions from the umask."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = parent / f".tmp-{secrets.token_hex(4)}"
            try:
                tmp.mkdir(0o777)
                return tmp
            except FileExistsError:
                continue
    except OSError as error:
        raise WriteError(parent, error) from error


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[HashingFile]:
    """A HashingFile whose content replaces `target` only once it is completely on disk."""
    target = Path(target)
    with atomic_path(target) as tmp, written_file(tmp, shown=target) as handle:
        yield handle


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` for a writer that takes a file name; once the
    body succeeds it is fsynced and renamed over `target`. Failed writes raise WriteError."""
    target = Path(target)
    tmp: Path | None = None
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_file(target)
            mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gave a new file
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
                if stat.S_IMODE(os.fstat(handle.fileno()).st_mode) != mode:
                    os.chmod(tmp, mode)  # a writer that replaced the file made it 0600
            os.replace(tmp, target)
        except WriteError:
            raise
        except Exception as error:
            cause = os_error_of(error)
            if cause is None:
                raise
            raise WriteError(target, cause) from error
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(target) as tmp:
        write(tmp)


def atomic_write_text(target: Path, text: str) -> None:
    with atomic_file(target) as handle:
        handle.write(text.encode("utf-8"))


def remove_leftovers(
    folder: Path, *, prefix: str = ".", recursive: bool = False, older_than_s: float = 0
) -> int:
    """Delete the temporary files and folders that killed writers left in `folder` (names
    starting with `prefix`; with `older_than_s`, only those untouched for that long, where other
    processes may be writing). Returns the bytes freed."""
    if not folder.is_dir():
        return 0
    freed = 0
    cutoff = time.time() - older_than_s
    entries = folder.rglob(".*") if recursive else folder.iterdir()
    for path in list(entries):
        name = path.name
        if not name.startswith(prefix):
            continue
        try:
            stat = path.lstat()
            if older_than_s and stat.st_mtime > cutoff:
                continue
            if _LEFTOVER_FILE.match(name) and path.is_file() and not path.is_symlink():
                path.unlink()
                freed += stat.st_size
            elif _LEFTOVER_DIR.match(name) and path.is_dir() and not path.is_symlink():
                freed += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path)
        except OSError:
            continue  # gone already, or not ours to remove: the next start tries again
    return freed
