"""Endpoints outside the inventory that every node must reach, read from kubespray variables.

An install pulls images and files before anything else runs: from ``registry_host``, from MinIO
(``minio_address``) or another files server (``files_repo``), and from the hosts behind the
``*_image_repo`` and download URL variables (``github_url``, ``dl_k8s_io_url``,
``storage_googleapis_url``, ``get_helm_url``, ``*_download_url``, the OS package mirrors
``yum_repo`` / ``debian_repo`` / ``ubuntu_repo``). Each distinct host:port among the variables the
configuration *sets* becomes one destination, named after the first variable that points there
(``registry_host``, ``minio_address``, ``files_repo``, then the others by name), with every other
variable recorded. kubespray's own defaults for these variables name public Internet hosts
(registry.k8s.io, quay.io, github.com...); they are not planned: a cluster that pulls from the
Internet says nothing about it in its inventory, and portmesh does not probe the Internet.

Only the authority of a value is needed, so a template resolves far enough when everything up to
the host and port does: ``"{{ files_repo }}/dl.k8s.io/release/v{{ kube_version }}/..."`` gives
files_repo's host even though ``kube_version`` is not known here. Pure: no I/O, no DNS.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from scanner.core.model import Endpoint
from scanner.errors import InventoryError
from scanner.plan.templates import UNRESOLVED, VAULTED, Vaulted, eval_expr, redact

PRIMARY = ("registry_host", "minio_address", "files_repo")
BASE_URLS = (
    "github_url",
    "dl_k8s_io_url",
    "storage_googleapis_url",
    "get_helm_url",
    "yum_repo",
    "debian_repo",
    "ubuntu_repo",
)
_EXPR = re.compile(r"\{\{((?:(?!\}\}).)*?)\}\}", re.S)


def _unset(value: Any) -> Any:
    return UNRESOLVED if value is None else value


# URL and host:port lists: registry mirrors (Kubean's air-gap example sets the containerd ones)
LISTS = ("containerd_registries_mirrors", "docker_registry_mirrors", "docker_insecure_registries")
PROXIES = ("http_proxy", "https_proxy")
SUFFIXES = ("_image_repo", "_download_url", "_repo_base_url", "_install_url")
_STRUCT_KEYS = ("host", "url", "mirrors")  # where a list's items keep their URL


def is_endpoint_var(name: str) -> bool:
    return (
        name in PRIMARY
        or name in BASE_URLS
        or name in LISTS
        or name in PROXIES
        or name.endswith(SUFFIXES)
    )


def _items(label: str, value: Any) -> list[tuple[str, Any]]:
    """(label, scalar) for every URL a value holds: the value itself, or a list's items, or the
    ``host`` / ``url`` / ``mirrors`` of its mappings (containerd_registries_mirrors)."""
    if isinstance(value, list):
        out: list[tuple[str, Any]] = []
        for i, item in enumerate(value):
            out.extend(_items(f"{label}[{i}]", item))
        return out
    if isinstance(value, dict) and "__ansible_vault" not in value:
        out = []
        for key in _STRUCT_KEYS:
            if key in value:
                out.extend(_items(f"{label}.{key}", value[key]))
        return out
    return [(label, value)]


def _order(name: str) -> tuple[int, str]:
    if name in PRIMARY:
        return (PRIMARY.index(name), name)
    if name in BASE_URLS:
        return (10 + BASE_URLS.index(name), name)
    return (100, name)


def _prefix(raw: str, lookup: Callable[[str], Any]) -> tuple[str, bool]:
    """``raw`` with ``{{ name }}`` references substituted up to the first one that does not
    resolve to a scalar; (text, complete)."""
    out: list[str] = []
    pos = 0
    for m in _EXPR.finditer(raw):
        out.append(raw[pos : m.start()])
        value = eval_expr(m.group(1), lambda n: _unset(lookup(n)))
        if value is UNRESOLVED or isinstance(value, (dict, list)) or value is None:
            return "".join(out), False
        out.append(str(value))
        pos = m.end()
    rest = raw[pos:]
    if "{%" in rest or "{{" in rest:
        return "".join(out) + rest.split("{", 1)[0], False
    out.append(rest)
    return "".join(out), True


def authority(
    name: str, raw: Any, lookup: Callable[[str], Any], parse: Callable[[str, int], Any]
) -> tuple[str, int] | None:
    """(host, port) a variable's value points at; None when its template does not resolve that
    far. ``parse`` is kubean.parse_host_port; a value that resolves but is no host raises."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    text, complete = _prefix(raw.strip(), lookup)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        host, slash, _ = rest.partition("/")
        if not slash and not complete:
            return None
        text, default = f"{scheme}://{host}", 443
    else:
        host, slash, _ = text.partition("/")
        if not slash and not complete:
            return None
        text, default = host, 9000 if name == "minio_address" else 443
    hp = parse(text, default)
    if hp is None:
        raise InventoryError(
            redact(f"variable {name}: {raw!r} does not point at a host[:port]")
        )
    return hp


LB = "loadbalancer_apiserver"


def _loadbalancer(
    raw: Mapping[str, Any],
    lookup: Callable[[str], Any],
    source: Callable[[str], str],
    parse: Callable[[str, int], Any],
) -> tuple[str, int] | None:
    """kubespray's external API load balancer: ``loadbalancer_apiserver.address`` at
    ``.port | default(kube_apiserver_port)``, the API endpoint every node uses."""
    lb = raw.get(LB)
    if not isinstance(lb, dict) or not isinstance(lb.get("address"), str):
        return None
    where = source(LB).split(": ", 1)[0]
    port = lb.get("port")
    if port is None:
        port = lookup("kube_apiserver_port")
    if port is None:
        port = 6443
    text = f"{lb['address'].strip()}:{str(port).strip()}"
    if ":" in lb["address"].strip():  # IPv6
        text = f"[{lb['address'].strip()}]:{str(port).strip()}"
    hp = parse(text, 6443)
    if hp is None:
        raise InventoryError(
            f"{where}: variable {LB}: address {lb['address']!r} port {port!r} is not host:port"
        )
    return hp


def _source(source: Callable[[str], str], label: str, var_of: Mapping[str, str]) -> str:
    name = var_of.get(label, label)
    if name == label:
        return source(name)
    return f"{source(name).split(': ', 1)[0]}: {label}"


def endpoints(
    raw: Mapping[str, Any],
    lookup: Callable[[str], Any],
    source: Callable[[str], str],
    parse: Callable[[str, int], Any],
) -> tuple[tuple[Endpoint, ...], dict[str, str]]:
    """The endpoints the variables set, and the endpoint variables that did not resolve.

    ``raw``: merged variables as written; ``lookup(name)``: a resolved value or a sentinel that is
    not a scalar; ``source(name)``: "file: name=value" for messages.
    """
    found: dict[tuple[str, int], list[str]] = {}
    unresolved: dict[str, str] = {}
    var_of: dict[str, str] = {}
    for name in sorted((n for n in raw if is_endpoint_var(n)), key=_order):
        for label, value in _items(name, raw[name]):
            if value is None or value == "":
                continue
            if isinstance(value, (Vaulted, dict)):
                unresolved[name] = str(VAULTED)
                continue
            if not isinstance(value, str):
                raise InventoryError(
                    f"{source(name).split(': ', 1)[0]}: variable {label}: {value!r} is not a URL"
                    " or host[:port]"
                )
            try:
                hp = authority(label, value, lookup, parse)
            except InventoryError as e:
                raise InventoryError(f"{source(name).split(': ', 1)[0]}: {e}") from None
            if hp is None:
                unresolved[name] = str(value)
                continue
            found.setdefault((hp[0], hp[1]), []).append(label)
            var_of[label] = name
    lb = _loadbalancer(raw, lookup, source, parse)
    if lb is not None:
        found.setdefault(lb, []).insert(0, LB)
    out = tuple(
        Endpoint(names[0], host, port, tuple(names), _source(source, names[0], var_of))
        for (host, port), names in found.items()
    )
    return out, unresolved
