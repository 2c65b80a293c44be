"""What `portmesh watch rules` and `portmesh watch manifests` print (pure): the alert rules and
the Kubernetes objects that run one agent per node.

The rules are written for the series in scanner.watch.metrics; every alert is one per
requirement or one per node (``instance``), never one per pair. ``for_`` is a parameter only so
that a lab test can watch the same expressions fire in seconds; what ships is the default.
"""

from __future__ import annotations

from typing import Any

import yaml

DEFAULT_FOR = "2m"
# the job label Prometheus gives the agents: the shipped PodMonitor takes it from the pods'
# app.kubernetes.io/name label (jobLabel), so the rules can name it
JOB = "portmesh-watch"


def rules(for_: str = DEFAULT_FOR, job: str = JOB) -> dict[str, Any]:
    def rule(name: str, expr: str, summary: str, severity: str = "warning", for_at: str = for_):
        return {
            "alert": name,
            "expr": expr,
            "for": for_at,
            "labels": {"severity": severity},
            "annotations": {"summary": summary},
        }

    return {
        "groups": [
            {
                "name": "portmesh",
                "rules": [
                    rule(
                        "PortmeshRequirementFailing",
                        # both directions: a UDP drop is silence to the sender (unknown) and
                        # a missing probe to the receiver (incoming fails)
                        "sum by (req) (portmesh_flows_failing) > 0",
                        "{{ $labels.req }}: {{ $value }} node-peer directions fail",
                        "critical",
                    ),
                    rule(
                        "PortmeshOneWayFlow",
                        "portmesh_one_way_flows > 0",
                        "{{ $labels.instance }}: {{ $value }} flows fail towards peers whose"
                        " probes to it arrive (one-way; the agent's events name them)",
                    ),
                    rule(
                        "PortmeshNodeUnreachable",
                        "portmesh_incoming_peers_expected > 0 and portmesh_incoming_peers_silent"
                        " / portmesh_incoming_peers_expected > 0.5",
                        "{{ $labels.instance }}: most peers' probes never arrive",
                        "critical",
                    ),
                    rule(
                        "PortmeshCoverageLow",
                        "portmesh_sweep_coverage_ratio < 0.9",
                        "{{ $labels.instance }}: only {{ $value | humanizePercentage }} of"
                        " the last sweep got a verdict",
                        for_at="10m",
                    ),
                    rule(
                        "PortmeshSweepStale",
                        "portmesh_last_sweep_timestamp_seconds > 0 and time() -"
                        " portmesh_last_sweep_timestamp_seconds > 3 * portmesh_sweep_seconds",
                        "{{ $labels.instance }}: no full sweep for three sweeps' time",
                        for_at="5m",
                    ),
                    rule(
                        "PortmeshScheduleMismatch",
                        f'count(count by (schedule) (portmesh_schedule_info{{job="{job}"}})) > 1',
                        "the portmesh agents run {{ $value }} different schedules (another"
                        " --round, --rate, --neighbours, --chunk or inventory, or a rolling"
                        " update): incoming failures are not to be trusted until they agree",
                        for_at="5m",
                    ),
                    rule(
                        "PortmeshAgentAbsent",
                        f'up{{job="{job}"}} == 0',
                        "{{ $labels.instance }}: the portmesh agent does not answer (node down?)",
                        "critical",
                    ),
                ],
            }
        ]
    }


def rules_text(for_: str = DEFAULT_FOR, job: str = JOB) -> str:
    return yaml.safe_dump(rules(for_, job), sort_keys=False)


def manifests(image: str, namespace: str = "portmesh", port: int = 9470) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "portmesh-watch"}
    meta = {"namespace": namespace, "labels": labels}
    args = [
        "watch",
        "--inventory",
        "/etc/portmesh/inventory.yml",
        "--secret-file",
        "/etc/portmesh-secret/secret",
        "--as",
        "$(NODE_NAME)",
        "--metrics",
        f"0.0.0.0:{port}",
    ]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            # no Role: the agent reads its inventory and secret from volumes and never calls
            # the API server (no periodic LIST of nodes), so its account needs no permission
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "portmesh-watch", **meta},
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "portmesh-watch", **meta},
            "spec": {
                "selector": {"matchLabels": labels},
                "updateStrategy": {"type": "RollingUpdate"},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(port),
                        },
                    },
                    "spec": {
                        "serviceAccountName": "portmesh-watch",
                        "automountServiceAccountToken": False,
                        "hostNetwork": True,
                        "dnsPolicy": "ClusterFirstWithHostNet",
                        "tolerations": [{"operator": "Exists"}],
                        "priorityClassName": "system-node-critical",
                        "containers": [
                            {
                                "name": "watch",
                                "image": image,
                                "command": ["portmesh"],
                                "args": args,
                                "env": [
                                    {
                                        "name": "NODE_NAME",
                                        "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                                    }
                                ],
                                "ports": [{"name": "metrics", "containerPort": port}],
                                "readinessProbe": {
                                    "httpGet": {"path": "/healthz", "port": port},
                                    "periodSeconds": 10,
                                },
                                "resources": {
                                    "requests": {"cpu": "20m", "memory": "64Mi"},
                                    "limits": {"memory": "256Mi"},
                                },
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {
                                        "drop": ["ALL"],
                                        # ICMP / IP-in-IP probes, the witness, low responder ports
                                        "add": ["NET_RAW", "NET_BIND_SERVICE"],
                                    },
                                },
                                "volumeMounts": [
                                    {
                                        "name": "inventory",
                                        "mountPath": "/etc/portmesh",
                                        "readOnly": True,
                                    },
                                    {
                                        "name": "secret",
                                        "mountPath": "/etc/portmesh-secret",
                                        "readOnly": True,
                                    },
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "inventory", "configMap": {"name": "portmesh-inventory"}},
                            {"name": "secret", "secret": {"secretName": "portmesh-secret"}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "portmesh", **meta},
            "spec": rules(),
        },
        {
            # how the Prometheus operator finds the agents (it ignores prometheus.io annotations)
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": "portmesh-watch", **meta},
            "spec": {
                "jobLabel": "app.kubernetes.io/name",
                "selector": {"matchLabels": labels},
                "podMetricsEndpoints": [{"port": "metrics", "interval": "30s"}],
            },
        },
    ]


def manifests_text(image: str, namespace: str = "portmesh", port: int = 9470) -> str:
    return yaml.safe_dump_all(manifests(image, namespace, port), sort_keys=False)
