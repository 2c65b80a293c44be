"""What crosses the agent's control channel (scanner/mesh/agent.py): the site as plain JSON
data and back, the field checks that turn a malformed message into a ProtocolError naming the
field, and the output channel (stdout, shared by the control loop and the probing thread).

Pure but for the channel's writes; the coordinator and the agent both use it.
"""

from __future__ import annotations

import threading
from typing import Any

import orjson

from scanner.core.model import Cluster, ClusterConfig, Endpoint, Host, Setting, Site
from scanner.core.results import encode_results
from scanner.engine.output import NdjsonOutput


class TallyGroups:
    """An agent's tally records on the wire (``done``'s ``tally_groups``), in columns: the
    records that share requirement, protocol, family, source address, states and ports
    (at 1,000 hosts with the NodePort sample, ~1,000 directions each) are one group
    ``[req, proto, af, src, states, ports, [host, dst, host, dst, ...]]``; a record's
    ``flows`` is the sum of its states. The coordinator writes the same tally lines from a
    group's bytes put together once (Mesh.on_tally_groups) instead of reading ~9 M nested
    entries at 1,000 hosts. Record order: by group, in each group the records' own order."""

    def __init__(self) -> None:
        self.groups: dict[tuple[Any, ...], list[Any]] = {}

    def add(self, rec: dict[str, Any]) -> None:
        st = rec["states"]
        key = (rec["req"], rec["proto"], rec.get("af"), rec.get("src"), tuple(st.items()),
               rec.get("ports"))  # fmt: skip
        pairs = self.groups.get(key)
        if pairs is None:
            pairs = self.groups[key] = []
        pairs += (rec["host"], rec["dst"])

    def wire(self) -> list[list[Any]]:
        return [[req, proto, af, src, dict(st), ports, pairs]
                for (req, proto, af, src, st, ports), pairs in self.groups.items()]  # fmt: skip


class PassBlocks:
    """An agent's passing results under ``--emit all`` (protocol 3), in blocks: a header line
    ``{"type":"passes","n":N,"i":[start,length,...],"why":{reason:count},"groups":[...]}``
    then the N result lines themselves, without their plan index ``i`` (the header's runs
    give the indexes, in line order). A group ``[req, proto, af, src, src_host, state, port,
    [host, dst, host, dst, ...]]`` lists the lines that share everything the coordinator
    folds but the destination, so it folds ~500 lines by a handful of groups and forwards
    their bytes without reading them (Mesh.on_passes; 26 M lines at 1,000 hosts). Header and
    lines go out in one write, so no other record comes between them.

    The engine's runner calls ``add`` for every passing result (after annotate) and writes
    ``take()`` when ``add`` says the block is full, and at every flush."""

    HEAD = b'{"type":"passes",'

    def __init__(self, scan_id: str, size: int = 512) -> None:
        self.scan_id = scan_id
        self.size = size
        self.results: list[Any] = []
        self.runs: list[int] = []  # start, length, start, length, ...
        self.why: dict[str, int] = {}
        self.groups: dict[tuple[Any, ...], list[Any]] = {}

    def add(self, r: Any) -> bool:
        """One passing result (its ``extra["i"]`` is taken off); True when the block is full."""
        f = r.flow
        extra = r.extra
        i = extra.pop("i") if extra else None
        if i.__class__ is not int:
            raise ValueError("a passing result without its plan index")
        runs = self.runs
        if runs and runs[-2] + runs[-1] == i:
            runs[-1] += 1
        else:
            runs += (i, 1)
        why = self.why
        why[r.reason] = why.get(r.reason, 0) + 1
        src = extra.get("src", f.src) if extra else f.src
        key = (f.req, f.proto, f.af, src, f.src_host, r.state, f.port)
        pairs = self.groups.get(key)
        if pairs is None:
            pairs = self.groups[key] = []
        pairs += (f.host, f.dst)
        self.results.append(r)
        return len(self.results) >= self.size

    def take(self) -> bytes:
        """The block (header and lines) of the results added since the last take; b"" if none."""
        results = self.results
        if not results:
            return b""
        head = {
            "type": "passes",
            "n": len(results),
            "i": self.runs,
            "why": self.why,
            "groups": [[*k, pairs] for k, pairs in self.groups.items()],
        }
        data = orjson.dumps(head, option=orjson.OPT_APPEND_NEWLINE) + encode_results(
            results, self.scan_id
        )
        self.results, self.runs, self.why, self.groups = [], [], {}, {}
        return data


class ProtocolError(Exception):
    """A control message that is malformed or out of order (answered with an error record)."""


# ---- the site on the wire -------------------------------------------------------------------


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (tuple, list)) else v


def _setting_out(s: Any) -> Any:
    return None if s is None else [_listify(s.value), s.source]


def _host_out(h: Any) -> dict[str, Any]:
    return {
        "name": h.name,
        "address": h.address,
        "roles": sorted(h.roles),
        "cluster": h.cluster,
        "user": h.user,
        "address6": h.address6,
    }


def site_to_wire(site: Any) -> dict[str, Any]:
    """A resolved Site as plain JSON data (the agent does not re-read inventories or vars)."""
    clusters = []
    for c in site.clusters:
        cfg = c.config
        clusters.append(
            {
                "name": c.name,
                "kind": c.kind,
                "hosts": [_host_out(h) for h in c.hosts],
                "vips": dict(c.vips),
                "config": {
                    "cni": _setting_out(cfg.cni),
                    "features": {k: _setting_out(v) for k, v in cfg.features.items()},
                    "nodeport_range": _setting_out(cfg.nodeport_range),
                    "apiserver_port": _setting_out(cfg.apiserver_port),
                    "registry": _setting_out(cfg.registry),
                    "minio": _setting_out(cfg.minio),
                    "unresolved": dict(cfg.unresolved),
                    "families": _setting_out(cfg.families),
                    "vxlan6": _setting_out(cfg.vxlan6),
                    "endpoints": [
                        [e.name, e.host, e.port, list(e.vars), e.source] for e in cfg.endpoints
                    ],
                },
            }
        )
    return {
        "clusters": clusters,
        "bootstrap": None if site.bootstrap is None else _host_out(site.bootstrap),
        "vips": dict(site.vips),
        "source": site.source,
    }


def _want(d: Any, key: str, kinds: tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise ProtocolError(f"{where}: expected an object")
    if key not in d:
        raise ProtocolError(f"{where}: field {key!r} is missing")
    v = d[key]
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise ProtocolError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _str_map(v: Any, where: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise ProtocolError(f"{where}: expected an object of strings")
    return dict(v)


def _setting_in(v: Any, where: str) -> Any:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], str):
        raise ProtocolError(f"{where}: expected [value, source]")
    return Setting(_tuplify(v[0]), v[1])


def _host_in(d: Any, where: str) -> Any:
    roles = _want(d, "roles", (list,), where)
    if not all(isinstance(r, str) for r in roles):
        raise ProtocolError(f"{where}: field 'roles': expected strings")
    return Host(
        _want(d, "name", (str,), where),
        _want(d, "address", (str,), where),
        frozenset(roles),
        _want(d, "cluster", (str, type(None)), where),
        _want(d, "user", (str, type(None)), where),
        d.get("address6") if isinstance(d.get("address6"), str) else None,
    )


def _endpoints_in(v: Any, where: str) -> tuple[Any, ...]:
    """[[name, host, port, [vars], source], ...] -> Endpoints (scanner/plan/endpoints.py)."""
    if not isinstance(v, list):
        raise ProtocolError(f"{where}: expected a list")
    out = []
    for i, e in enumerate(v):
        if (
            not isinstance(e, list)
            or len(e) != 5
            or not all(isinstance(x, str) for x in (e[0], e[1], e[4]))
            or isinstance(e[2], bool)
            or not isinstance(e[2], int)
            or not 1 <= e[2] <= 65535
            or not isinstance(e[3], list)
            or not all(isinstance(x, str) for x in e[3])
        ):
            raise ProtocolError(f"{where}[{i}]: expected [name, host, port, [vars], source]")
        out.append(Endpoint(e[0], e[1], e[2], tuple(e[3]), e[4]))
    return tuple(out)


def site_from_wire(d: Any) -> Any:
    """The inverse of site_to_wire; ProtocolError naming the field on anything malformed."""
    clusters = []
    for i, c in enumerate(_want(d, "clusters", (list,), "site")):
        w = f"site: clusters[{i}]"
        hosts = tuple(
            _host_in(h, f"{w}.hosts[{j}]") for j, h in enumerate(_want(c, "hosts", (list,), w))
        )
        cfg = _want(c, "config", (dict,), w)
        cw = f"{w}.config"
        feats = _want(cfg, "features", (dict,), cw)
        cni = _setting_in(_want(cfg, "cni", (list,), cw), f"{cw}.cni")
        config = ClusterConfig(
            cni=cni,
            features={str(k): _setting_in(v, f"{cw}.features.{k}") for k, v in feats.items()},
            nodeport_range=_setting_in(_want(cfg, "nodeport_range", (list,), cw), cw),
            apiserver_port=_setting_in(_want(cfg, "apiserver_port", (list,), cw), cw),
            registry=_setting_in(cfg.get("registry"), f"{cw}.registry"),
            minio=_setting_in(cfg.get("minio"), f"{cw}.minio"),
            unresolved=_str_map(cfg.get("unresolved", {}), f"{cw}.unresolved"),
            **{
                k: _setting_in(cfg[k], f"{cw}.{k}")
                for k in ("families", "vxlan6")
                if cfg.get(k) is not None
            },
            endpoints=_endpoints_in(cfg.get("endpoints", []), f"{cw}.endpoints"),
        )
        if any(v is None for v in config.features.values()):
            raise ProtocolError(f"{cw}.features: a feature without a setting")
        clusters.append(
            Cluster(
                _want(c, "name", (str,), w),
                _want(c, "kind", (str,), w),
                hosts,
                _str_map(c.get("vips", {}), f"{w}.vips"),
                config,
            )
        )
    boot = d.get("bootstrap")
    return Site(
        tuple(clusters),
        None if boot is None else _host_in(boot, "site: bootstrap"),
        _str_map(d.get("vips", {}), "site: vips"),
        str(d.get("source") or ""),
    )


def _ports_in(v: Any, where: str) -> list[int]:
    """ "2379-2380,30000" -> ports (strictly: digits, commas, dashes; 1-65535)."""
    if not isinstance(v, str):
        raise ProtocolError(f"{where}: expected a port list string")
    out: list[int] = []
    for tok in v.split(","):
        tok = tok.strip()
        if not tok:
            continue
        lo_s, _, hi_s = tok.partition("-")
        if not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
            raise ProtocolError(f"{where}: bad port {tok!r}")
        lo, hi = int(lo_s), int(hi_s or lo_s)
        if not 1 <= lo <= hi <= 65535:
            raise ProtocolError(f"{where}: port {tok!r} is not within 1-65535")
        out.extend(range(lo, hi + 1))
    return out


def _unbound_in(v: Any) -> dict[tuple[str, str], frozenset[int]]:
    """The probe message's ``unbound``: {address: {"tcp": ranges, "udp": ranges}}."""
    if not isinstance(v, dict):
        raise ProtocolError("probe: unbound must be an object")
    out: dict[tuple[str, str], frozenset[int]] = {}
    for addr, protos in v.items():
        if not isinstance(protos, dict):
            raise ProtocolError("probe: unbound values must be objects")
        for proto in ("tcp", "udp"):
            ports = _ports_in(protos.get(proto, ""), f"probe: unbound.{proto}")
            if ports:
                out[(str(addr), proto)] = frozenset(ports)
    return out


# ---- the output channel ---------------------------------------------------------------------


class Channel(NdjsonOutput):
    """stdout, shared by the control loop and the probing thread (whole lines, under a lock).

    The runner's start record goes out as ``probing``, its summary as ``done``; ``stopping``
    tells the engine (through ``dead``) to launch nothing new.
    """

    def __init__(self, fd: int = 1) -> None:
        super().__init__(None, stdout=True, fd=fd)
        self._lock = threading.RLock()
        self.stopping = False
        self.tallies = TallyGroups()  # --emit failures: sent inside ``done``

    @property
    def dead(self) -> bool:  # type: ignore[override]
        return self.stopping or self.stdout_closed

    def record(self, rec: dict[str, Any]) -> None:
        t = rec.get("type")
        if t == "start":
            rec = {"type": "probing", "scan_id": rec.get("scan_id"), "planned": rec.get("planned")}
        elif t == "tally":
            # one record per (destination, requirement), all inside ``done``: the coordinator
            # counts them together with the done or not at all (an agent that dies before it
            # says done owes every flow it did not send)
            self.tallies.add(rec)
            return
        elif t == "summary":
            rec = {**rec, "type": "done"}
            if self.tallies.groups:
                rec["tally_groups"] = self.tallies.wire()
        with self._lock:
            super().record(rec)

    def send(self, rec: dict[str, Any]) -> None:
        """One control record, written through at once."""
        with self._lock:
            super().record(rec)
            super().flush()

    def write(self, data: bytes) -> None:
        with self._lock:
            super().write(data)

    def flush(self) -> None:
        with self._lock:
            super().flush()
