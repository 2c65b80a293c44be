"""`portmesh ansible playbook|kubean`: the mesh as an Ansible playbook (scanner.ansible)."""

from __future__ import annotations

import shlex
import sys

import click

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
    metavar="KEY=VALUE",
    help="Playbook variables for the preHook (repeatable): -e portmesh_nodeport_sample=16.",
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
        if "=" not in e or not e.split("=", 1)[0].strip():
            raise InputError(f"-e {e!r}: give KEY=VALUE")
        words += ["-e", e]
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
