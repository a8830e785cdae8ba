"""The one exception type for user errors.

Its message says what is wrong and what to do, on one line; the CLI prints it without a
traceback and exits with code 2 (docs/architecture.md, "Errors").
"""


class MediFastError(Exception):
    """A problem the user can fix: bad path, unknown class, corrupt file, ..."""

    exit_code = 2


def suggest(value: str, choices, n: int = 3) -> str:
    """`" (closest: 'a', 'b')"` for an unknown value, or an empty string."""
    import difflib

    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=n, cutoff=0.5)
    if not close:
        # Case-insensitive and prefix matches catch what difflib misses ('luad', '5' for '05').
        low = str(value).lower()
        close = [c for c in choices if c.lower() == low or c.lstrip("0") == low.lstrip("0")][:n]
    if not close:
        return ""
    return " (closest: " + ", ".join(repr(c) for c in close) + ")"


def one_line(text: str) -> str:
    """Collapse a message onto one line (messages quote library errors that span several)."""
    return " ".join(str(text).split())


def from_exception(e: BaseException) -> MediFastError | None:
    """The user error behind an exception a bad input causes (missing file, directory for a file,
    undecodable or empty table, no memory left...), or None for anything else: an unknown type is
    a bug and keeps its traceback."""
    import errno

    if isinstance(e, MediFastError):
        return e
    if isinstance(e, OSError) and e.errno is not None:
        name = e.filename if e.filename is not None else "a file"
        messages = {
            errno.ENOENT: f"{name} does not exist; check the path",
            errno.EISDIR: f"{name} is a directory where a file is expected; give a file",
            errno.ENOTDIR: f"{name}: a part of the path is a file, not a directory; check the path",
            errno.EACCES: f"permission denied on {name}; fix its permissions or choose another path",
            errno.EPERM: f"permission denied on {name}; fix its permissions or choose another path",
            errno.EROFS: f"{name} is on a read-only file system; choose another output location",
            errno.ENOSPC: "disk full; free space, then rerun the same command to resume",
            errno.ENAMETOOLONG: f"file name too long: {name}; choose a shorter path",
        }
        if e.errno in messages:
            return MediFastError(messages[e.errno])
    if isinstance(e, UnicodeDecodeError):
        return MediFastError(f"an input file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")
    if isinstance(e, MemoryError):
        return MediFastError("not enough memory for this input; use a smaller --batch-size or --n")
    # pandas and torch are imported here, not at the top: every command imports this module, and
    # `medi-fast --help` must not pay for them.
    import pandas as pd
    import torch

    if isinstance(e, pd.errors.EmptyDataError):
        return MediFastError("an input table is empty (no columns); check the path or re-create the file")
    if isinstance(e, pd.errors.ParserError):
        return MediFastError(f"an input CSV is malformed ({one_line(e)[:160]}); fix the file")
    if isinstance(e, torch.OutOfMemoryError):
        return MediFastError("the device ran out of memory; use a smaller --batch-size")
    return None


def check_seed(seed: int, name: str = "--seed", bits: int = 32) -> int:
    """Seeds feed numpy (0 .. 2**32-1) and torch; refuse others here rather than deep in a library."""
    if not 0 <= int(seed) < 2**bits:
        raise MediFastError(f"{name} must be in 0..{2**bits - 1}, got {seed}")
    return int(seed)
