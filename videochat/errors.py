"""How the `python -m videochat ...` commands report a failure the user can fix: one `error: ...` line on
stderr and a documented exit code, never a traceback. Torch-free (the `serve` launcher imports it).

Exit codes: 0 ok, 1 other failure (the server could not be started), 2 bad input or usage (a flag value, a
path, a file, a checkpoint, a busy port), 130 interrupted. Anything outside `USER_ERRORS` is a bug and keeps
its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UserError(Exception):
    """A failure whose message alone tells the user what to fix. The project's own input errors
    (`ConfigError`, `CheckpointError`, `TokenizerNotFoundError`) derive from it as well as from the builtin
    type they always were."""

    exit_code: int = EXIT_USAGE


# What an entry point reports as one line. OSError is here because every path the commands open is the
# user's (checkpoint, video, work or output directory), so its errno text is the message the user needs.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)


def one_line(exc: BaseException) -> str:
    """The message of `exc` folded onto one line (multi-line messages list one item per line)."""
    summary = getattr(exc, "summary", None)
    if summary:
        return summary
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    parts = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not parts:
        return type(exc).__name__
    text = parts[0]
    for part in parts[1:]:
        text += (" " if text.endswith(":") else "; ") + part
    return text


def report(exc: BaseException, exit_code: int | None = None) -> int:
    """Print `error: <message>` on stderr; return the exit code (the exception's own unless given)."""
    print(f"error: {one_line(exc)}", file=sys.stderr)
    return exit_code if exit_code is not None else getattr(exc, "exit_code", EXIT_USAGE)


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """Run a command's `main(argv)`: user errors become one line and their exit code, Ctrl-C exits 130."""
    try:
        return int(main(list(argv)) or 0)
    except USER_ERRORS as exc:
        return report(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
