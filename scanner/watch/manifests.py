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


def rules(for_: str = DEFAULT_FOR, job: str = "portmesh") -> dict[str, Any]:
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
                        'sum by (req) (portmesh_flows_failing{direction="outgoing"}) > 0',
                        "{{ $labels.req }}: {{ $value }} node-to-peer flows fail",
                        "critical",
                    ),
                    rule(
                        "PortmeshOneWayFlow",
                        "sum by (req, instance) (portmesh_one_way_flows) > 0",
                        "{{ $labels.instance }}: {{ $labels.req }} fails towards {{ $value }}"
                        " peers whose probes to it arrive (one-way)",
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
                        "time() - portmesh_last_sweep_timestamp_seconds > 900",
                        "{{ $labels.instance }}: no full sweep for 15 minutes",
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


def rules_text(for_: str = DEFAULT_FOR, job: str = "portmesh") -> str:
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
            "spec": rules(job="portmesh"),
        },
    ]


def manifests_text(image: str, namespace: str = "portmesh", port: int = 9470) -> str:
    return yaml.safe_dump_all(manifests(image, namespace, port), sort_keys=False)
