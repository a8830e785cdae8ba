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
