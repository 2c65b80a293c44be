"""The console script ``portmesh`` and ``python -m scanner``: ``scanner.cli.main``, with a Ctrl-C
that comes during start-up (the imports, before cli.main handles signals) ending as
``interrupted`` (exit 130), not a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        # lazy: the imports are what a start-up Ctrl-C interrupts (click, the commands: ~0.1 s)
        from scanner.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("\nportmesh: interrupted\n")
        raise SystemExit(130) from None
    cli_main()
