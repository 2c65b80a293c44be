"""`portmesh ansible playbook|kubean`: the mesh as an Ansible playbook (scanner.ansible)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from typing import Any

import click
import yaml

from scanner.errors import InputError

CTX = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CTX)
def command() -> None:
    """The mesh with Ansible's fan-out: the playbook, and Kubean's preHook for it.

    \b
    portmesh ansible playbook > portmesh.yml
    ansible-playbook -i INVENTORY portmesh.yml -f 50 -e portmesh_nodeport_sample=16
    portmesh ansible kubean --cluster NAME | kubectl apply -f -
    """


@command.command("playbook", context_settings=CTX)
def playbook() -> int:
    """Print the playbook (ansible-playbook -i INVENTORY portmesh.yml; variables in its header)."""
    # lazy: the library loads after option parsing, so `portmesh ansible --help` and bad options
    # cost ~0.05 s CPU instead of ~0.09 s with these imports at the top (measured, median of 10)
    from scanner.ansible import playbook_text

    sys.stdout.write(playbook_text())
    return 0


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=[^\s'\"\\\[{]*\Z")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def extra_var(e: str) -> str:
    """One -e for the preHook's ansible-playbook: KEY=VALUE with a plain value as given (Ansible
    takes it as a string); a value that is a JSON/YAML list or mapping, or holds white space or
    quotes, and a JSON object of variables, as one JSON object (typed, quoted once)."""
    text = e.strip()
    if text.startswith("{"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise InputError(f"-e {e!r}: not a JSON (or YAML) object") from None
        if not isinstance(value, dict) or not value:
            raise InputError(f"-e {e!r}: give KEY=VALUE or a JSON object of variables")
        for k in value:
            if not _KEY.match(k):
                raise InputError(f"-e {e!r}: {k!r} is not a variable name")
        return json.dumps(value, separators=(", ", ": "))
    key, eq, raw = text.partition("=")
    if not eq or not _KEY.match(key.strip()):
        raise InputError(f"-e {e!r}: give KEY=VALUE or a JSON object of variables")
    if _PLAIN.match(f"{key.strip()}={raw}"):
        return f"{key.strip()}={raw}"
    parsed: Any = raw
    if raw.lstrip().startswith(("[", "{")):
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise InputError(f"-e {e!r}: the value is not a JSON/YAML list or mapping") from None
    return json.dumps({key.strip(): parsed}, separators=(", ", ": "))


@command.command("kubean", context_settings=CTX)
@click.option("--cluster", required=True, metavar="NAME", help="The Cluster.kubean.io name.")
@click.option(
    "--namespace",
    default="kubean-system",
    show_default=True,
    metavar="NS",
    help="Namespace of the ConfigMap holding the playbook.",
)
@click.option(
    "--image",
    default="ghcr.io/kubean-io/spray-job:latest",
    show_default=True,
    metavar="IMAGE",
    help="The spray-job image of the ClusterOperation (use the one of your Kubean release).",
)
@click.option(
    "--name", default=None, metavar="NAME", help="ClusterOperation name [CLUSTER-install-portmesh]."
)
@click.option(
    "--action",
    default="cluster.yml",
    show_default=True,
    help="The operation the check runs before.",
)
@click.option(
    "-e",
    "--extra-vars",
    "extra",
    multiple=True,
    metavar="KEY=VALUE|JSON",
    help="Playbook variables for the preHook (repeatable): -e portmesh_nodeport_sample=16;"
    " a JSON/YAML list or mapping as the VALUE (-e 'portmesh_without=[\"istio\"]'), or a JSON"
    ' object of variables as ansible-playbook\'s -e takes it (-e \'{"portmesh_with": ["x"]}\').',
)
def kubean(
    cluster: str, namespace: str, image: str, name: str | None, action: str, extra: tuple[str, ...]
) -> int:
    """Print a ConfigMap holding the playbook and a ClusterOperation whose preHook runs it.

    The preHook fails, and Kubean stops before ACTION starts, when a required flow fails.
    """
    # lazy: as in playbook() above (`portmesh ansible --help` stays light)
    from scanner.ansible.kubean import kubean_yaml

    words: list[str] = []
    for e in extra:
        words += ["-e", extra_var(e)]
    sys.stdout.write(
        kubean_yaml(
            cluster,
            namespace=namespace,
            image=image,
            name=name,
            extra_args=shlex.join(words),
            action=action,
        )
    )
    return 0
