"""`portmesh agent`: the mesh agent, NDJSON control over stdin/stdout (see scanner.mesh.agent)."""

from __future__ import annotations

import click

from scanner.mesh.agent import run_agent


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def command() -> int:
    """Serve a mesh coordinator on stdin/stdout (started by `portmesh mesh`, not by hand).

    Speaks the mesh protocol (docs/mesh.md): hello, respond, probe, stop. Opens no control
    port; exits when stdin closes, ending its responder with it.
    """
    return run_agent()
