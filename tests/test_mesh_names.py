"""A mesh agent's flow to a host-name destination (an endpoint outside the inventory, such as
kubespray's ``registry_host``) keeps its plan index once the engine has resolved the name.

The engine probes the resolved address, so the result's flow is not the planned one. The agent
found a flow's plan index by the flow itself, so such a result went out with ``"i": null``.
Where it failed, the coordinator took it for a broken line and owed the flow. Where it passed
under ``--emit all``, the agent's pass blocks refused it and its probing never ended.

Real sockets: a listener on 127.0.0.1 behind the name ``localhost``, and a port just freed.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading

import orjson
import pytest
import yaml

from scanner.engine.engine import EngineConfig
from scanner.mesh.probing import TOKEN_SAMPLE, probe_slice
from scanner.mesh.wire import Channel
from scanner.plan.selection import SelectionOptions
from scanner.probes.base import ProbeOptions
from tests.test_engine import freed_port


def _inventory(path, registry: int, minio: int) -> str:
    doc = {
        "all": {
            "hosts": {
                "n1": {"ansible_host": "127.0.0.1", "ip": "127.0.0.1"},
                "n2": {"ansible_host": "127.0.0.2", "ip": "127.0.0.2"},
            },
            "vars": {
                "registry_host": f"localhost:{registry}",
                "minio_address": f"localhost:{minio}",
            },
            "children": {
                "kube_control_plane": {"hosts": {"n1": None}},
                "etcd": {"hosts": {"n1": None}},
                "kube_node": {"hosts": {"n2": None}},
                "k8s_cluster": {"children": {"kube_control_plane": None, "kube_node": None}},
            },
        }
    }
    p = path / "inventory.yml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


@pytest.mark.parametrize("emit", ["all", "failures"])
def test_a_resolved_host_name_keeps_its_plan_index(tmp_path, emit: str) -> None:
    if socket.getaddrinfo("localhost", None, socket.AF_INET)[0][4][0] != "127.0.0.1":
        pytest.skip("localhost is not 127.0.0.1 here")
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    closed = freed_port()
    try:
        inv = _inventory(tmp_path, lst.getsockname()[1], closed)
        catalog, site, sel = SelectionOptions(inventories=(inv,)).resolve()
        sel = dataclasses.replace(sel, sources=frozenset({"n1"}))
        eng = EngineConfig(timeout=0.5, token_sample=TOKEN_SAMPLE, probe_options=ProbeOptions())
        path = tmp_path / "out.ndjson"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        out = Channel(fd)
        args = (catalog, site, sel, eng, out, "t", "reachable", "uvloop", None, emit)
        job = threading.Thread(target=probe_slice, args=args, daemon=True)
        job.start()
        job.join(60)
        assert not job.is_alive(), "the agent's probing never ended"
        out.flush()
        os.close(fd)
    finally:
        lst.close()
    recs = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    done = recs[-1]
    assert done["type"] == "done"
    assert done["results"] + done.get("tallied", 0) == done["planned"]
    seen: list[int] = []
    named = {}
    for r in recs:
        if r["type"] == "passes":
            for start, n in zip(r["i"][::2], r["i"][1::2], strict=True):
                seen += range(start, start + n)
        elif r["type"] == "result" and "i" in r:
            assert isinstance(r["i"], int), r
            seen.append(r["i"])
        if r["type"] == "result" and r["req"].startswith("endpoint."):
            named[r["req"]] = r
    if emit == "all":
        assert sorted(seen) == list(range(done["planned"])), "every planned flow exactly once"
    else:  # the passes are counted in tallies, not listed
        assert len(set(seen)) == len(seen) == done["planned"] - done["tallied"]
    minio = named["endpoint.minio_address"]
    assert (minio["dst"], minio["state"], minio["verdict"]) == ("127.0.0.1", "closed", "fail")
    if emit == "all":
        reg = named["endpoint.registry_host"]
        assert (reg["dst"], reg["state"], reg["verdict"]) == ("127.0.0.1", "open", "pass")
