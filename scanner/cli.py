"""The command line: a thin click layer.

Each subcommand lives in ``scanner/commands/<name>.py`` and is imported only when it is run,
so ``portmesh --version`` imports neither scapy nor uvloop. A command parses and validates its
options into a config object and calls one library function; no scanning logic lives here.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from scanner import __version__
from scanner.errors import ScannerError

# name -> (module, help line). Listed here so `portmesh --help` needs no import of the modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("scanner.commands.scan", "Probe targets and ports; stream NDJSON results."),
    "catalog": ("scanner.commands.catalog", "Show the port catalog (the requirements as data)."),
    "plan": ("scanner.commands.plan", "List the flows an inventory must allow."),
    "check": ("scanner.commands.check", "Probe this host's planned flows and give verdicts."),
    "respond": ("scanner.commands.respond", "Run temporary responders on this host's ports."),
    "lab": ("scanner.commands.lab", "Build or remove a simulated cluster in network namespaces."),
    "demo": ("scanner.commands.demo", "Run the built-in demonstration on a lab cluster."),
    "mesh": ("scanner.commands.mesh", "Probe every host pair from every host."),
    "agent": ("scanner.commands.agent", "The mesh agent (NDJSON over stdin/stdout)."),
    "report": ("scanner.commands.report", "Turn NDJSON results into a report."),
    "watch": ("scanner.commands.watch", "After install: keep checking the mesh; Prometheus metrics."),
    "ansible": ("scanner.commands.ansible", "The mesh as an Ansible playbook; Kubean's preHook."),
}


class LazyGroup(click.Group):
    loaded: object = None  # the module of the command being run, once resolved

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n, (mod, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        try:
            mod = importlib.import_module(entry[0])
        except ModuleNotFoundError as e:
            if e.name == entry[0]:
                return None
            raise
        self.loaded = mod
        return mod.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="portmesh")
def cli() -> None:
    """portmesh: prove that every port a Kubernetes cluster needs is open between every pair of hosts."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: click errors and ScannerError become one line on stderr and exit code 2."""
    try:
        rv = cli.main(args=argv, prog_name="portmesh", standalone_mode=False)
    except click.exceptions.Abort:
        sys.stderr.write("portmesh: interrupted\n")
        sys.exit(130)
    except click.ClickException as e:
        msg = e.format_message().replace("\n", " ")
        sys.stderr.write(f"portmesh: {msg}\n")
        sys.exit(2)
    except ScannerError as e:
        sys.stderr.write(f"portmesh: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("portmesh: interrupted\n")
        sys.exit(130)
    except BrokenPipeError:
        _quiet_broken_pipe()
        sys.exit(0)
    code = rv if isinstance(rv, int) else 0
    if getattr(cli.loaded, "FAST_EXIT", False):
        # The command closes every output file before it returns and says so with a module
        # flag: skip the interpreter's teardown (~15 ms of module and object finalisation
        # that a 0.2 s scan would notice). The CLI decides how the process exits.
        sys.stdout.flush()
        sys.stderr.flush()

        os._exit(code)
    sys.exit(code)


def _quiet_broken_pipe() -> None:
    # stdout's reader went away (| head): point stdout at /dev/null so the interpreter's final
    # flush does not print a second traceback.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
