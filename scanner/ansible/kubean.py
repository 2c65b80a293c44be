"""Kubean's custom action: the playbook in a ConfigMap, run as a preHook of ``cluster.yml``.

Kubean (``kubean.io/v1alpha1`` ``ClusterOperation``) runs its Ansible actions in a job whose
entrypoint script runs the preHooks, then the main action, with ``set -o errexit``: a preHook
playbook that fails stops the job before ``cluster.yml`` starts. A hook with
``actionSource: configmap`` takes its playbook from the ConfigMap named in
``actionSourceRef`` (the key is the ``action``), so the playbook travels as data.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from scanner.ansible import PLAYBOOK, playbook_text
from scanner.errors import InputError

API_VERSION = "kubean.io/v1alpha1"
DEFAULT_NAMESPACE = "kubean-system"
DEFAULT_IMAGE = "ghcr.io/kubean-io/spray-job:latest"


def _dns_name(value: str, what: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", value):
        raise InputError(
            f"{what} {value!r}: not a Kubernetes name (lower-case letters, digits, '-', '.')"
        )
    return value


def kubean_documents(
    cluster: str,
    namespace: str = DEFAULT_NAMESPACE,
    image: str = DEFAULT_IMAGE,
    name: str | None = None,
    extra_args: str = "",
    action: str = "cluster.yml",
) -> list[dict[str, Any]]:
    """[ConfigMap, ClusterOperation] as data (the caller dumps them as YAML documents)."""
    _dns_name(cluster, "--cluster")
    _dns_name(namespace, "--namespace")
    cm_name = _dns_name(f"{cluster}-portmesh", "the ConfigMap name")
    op_name = _dns_name(name or f"{cluster}-install-portmesh", "--name")
    if not image.strip():
        raise InputError("--image: empty")
    hook: dict[str, Any] = {
        "actionType": "playbook",
        "action": PLAYBOOK,
        "actionSource": "configmap",
        "actionSourceRef": {"name": cm_name, "namespace": namespace},
    }
    if extra_args:
        hook["extraArgs"] = extra_args
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": cm_name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "portmesh"},
        },
        "data": {PLAYBOOK: playbook_text()},
    }
    operation = {
        "apiVersion": API_VERSION,
        "kind": "ClusterOperation",
        "metadata": {"name": op_name, "labels": {"app.kubernetes.io/name": "portmesh"}},
        "spec": {
            "cluster": cluster,
            "image": image,
            "actionType": "playbook",
            "action": action,
            "preHook": [hook],
        },
    }
    return [configmap, operation]


def kubean_yaml(*args: Any, **kw: Any) -> str:
    """The two documents as YAML; the playbook as a literal block, readable in the ConfigMap."""
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    docs = kubean_documents(*args, **kw)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, explicit_start=True, width=100)
