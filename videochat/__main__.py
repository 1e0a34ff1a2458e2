"""`python -m videochat {chat,serve,make-demo-checkpoint}`: dispatch to the module that owns each command."""
from __future__ import annotations

import importlib
import sys

from videochat.errors import EXIT_USAGE, run_cli

# command -> module exposing `main(argv: list[str]) -> int`
COMMANDS = {
    "chat": "videochat.tools.chat",
    "serve": "videochat.launch.launcher",
    "make-demo-checkpoint": "videochat.tools.demo_checkpoint",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m videochat {{{','.join(COMMANDS)}}} ... (--help after a command for its flags)",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_USAGE
    module = importlib.import_module(COMMANDS[argv[0]])
    return run_cli(module.main, argv[1:])   # the one place user errors become `error: ...` + exit code


if __name__ == "__main__":
    sys.exit(main())
