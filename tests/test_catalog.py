"""The catalog: every document row is present, validation names file + entry + field."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.catalog import Condition, expand_ports, load_catalog
from scanner.errors import CatalogError

DATA = pathlib.Path(__file__).parent / "data"


def _rows():
    spec = importlib.util.spec_from_file_location("port_rows", DATA / "port_rows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PORT_ROWS = _rows()
CATALOG = load_catalog()


@pytest.mark.parametrize(("section", "proto", "port", "desc"), PORT_ROWS.ROWS)
def test_every_document_row_is_in_the_catalog(section, proto, port, desc):
    dsts, srcs = PORT_ROWS.SECTION_ROLES[section]
    hits = [
        r
        for r in CATALOG
        if r.proto == proto
        and (port in r.default_ports() if port is not None else r.ports is None)
        and r.dst_role in dsts
        and set(r.src_roles) == set(srcs)
    ]
    assert hits, f"no catalog entry for {section} {proto}/{port} ({desc})"


def test_catalog_has_no_entry_the_document_lacks():
    rows = {(proto, port) for _, proto, port, _ in PORT_ROWS.ROWS}
    for r in CATALOG:
        ports = r.default_ports() or [None]
        assert any((r.proto, p) in rows for p in ports), r.id


def test_10257_and_10259_carry_the_upstream_meaning_and_note_the_swap():
    cm = CATALOG.get("k8s.controller-manager")
    sched = CATALOG.get("k8s.scheduler")
    assert cm.default_ports() == [10257] and "controller-manager" in cm.description
    assert sched.default_ports() == [10259] and "scheduler" in sched.description
    assert "swap" in cm.note and "swap" in sched.note


def test_entries_are_complete():
    ids = [r.id for r in CATALOG]
    assert len(ids) == len(set(ids))
    for r in CATALOG:
        assert r.reference, r.id
        assert r.component and r.description and r.src_roles, r.id
        rec = r.record()
        for key in ("id", "component", "proto", "ports", "description", "dst_role", "src_roles"):
            assert key in rec
        assert "condition" in rec and "reference" in rec


@pytest.mark.parametrize(
    ("rid", "expected"),
    [
        ("calico.vxlan", {"cni": "calico", "feature": "vxlan"}),
        ("calico.ipip", {"cni": "calico", "feature": "ipip"}),
        ("metallb.memberlist.udp", {"feature": "metallb"}),
        ("cilium.health", {"cni": "cilium"}),
        ("worker.ssh", {"cluster": "worker", "feature": "deploy"}),
        ("istio.gateway.https", {"cluster": "global", "feature": "istio"}),
        ("etcd.client", None),
    ],
)
def test_conditions(rid, expected):
    assert CATALOG.get(rid).condition.as_dict() == expected


@pytest.mark.parametrize(
    ("spec", "values", "expected"),
    [
        ("22", {}, "22"),
        ("${nodeport_range}", {}, "30000-32767"),
        ("${nodeport_range}", {"nodeport_range": "31000-31010"}, "31000-31010"),
        ("${apiserver_port}", {"apiserver_port": "16443"}, "16443"),
        ("${registry_port:443}", {}, "443"),
        ("${registry_port:443}", {"registry_port": "5000"}, "5000"),
        ("${registry_port}", {}, None),
        ("${registry_port}", {"registry_port": None}, None),
        ("80,${minio_port:9000}", {"minio_port": "9500"}, "80,9500"),
    ],
)
def test_expand_ports(spec, values, expected):
    assert expand_ports(spec, values) == expected


def test_condition_text():
    assert Condition().text() == "always"
    assert Condition(cni=("calico",), features=("vxlan",)).text() == "cni=calico feature=vxlan"


GOOD = """
[[requirement]]
id = "x.one"
component = "x"
proto = "tcp"
ports = "8443"
description = "x"
dst_role = "node"
src_roles = ["node"]
"""


def _entry(**fields):
    base = {
        "id": '"x.one"',
        "component": '"x"',
        "proto": '"tcp"',
        "ports": '"8443"',
        "description": '"x"',
        "dst_role": '"node"',
        "src_roles": '["node"]',
    }
    base.update(fields)
    lines = [f"{k} = {v}" for k, v in base.items() if v is not None]
    return "[[requirement]]\n" + "\n".join(lines) + "\n"


BROKEN = [
    # (file text, entry named in the message, field named in the message)
    (_entry(proto='"sctp"'), "'x.one'", "'proto'"),
    (_entry(ports='"99999"'), "'x.one'", "'ports'"),
    (_entry(ports='"T:22"'), "'x.one'", "'ports'"),
    (_entry(ports='"${nodeports}"'), "'x.one'", "'ports'"),
    (_entry(ports='"${nodeport_range"'), "'x.one'", "'ports'"),
    (_entry(ports=None), "'x.one'", "'ports'"),
    (_entry(proto='"icmp"'), "'x.one'", "'ports'"),
    (_entry(dst_role='"moon"'), "'x.one'", "'dst_role'"),
    (_entry(dst_role='"scanner"'), "'x.one'", "'dst_role'"),
    (_entry(src_roles='["vip:insight"]'), "'x.one'", "'src_roles'"),
    (_entry(src_roles="[]"), "'x.one'", "'src_roles'"),
    (_entry(src_scope='"world"'), "'x.one'", "'src_scope'"),
    (_entry(description=None), "'x.one'", "'description'"),
    (_entry(description='""'), "'x.one'", "'description'"),
    (_entry(colour='"red"'), "'x.one'", "'colour'"),
    (_entry(condition='{ cni = "calico", flavour = "x" }'), "'x.one'", "'condition.flavour'"),
    (_entry(condition='{ cluster = "moon" }'), "'x.one'", "'condition.cluster'"),
    (_entry(condition='{ feature = ["Bad Word"] }'), "'x.one'", "'condition.feature'"),
    (_entry(condition='"calico"'), "'x.one'", "'condition'"),
    (_entry(sample='"yes"'), "'x.one'", "'sample'"),
    (_entry(id='"Bad Id"'), "'Bad Id'", "'id'"),
    (_entry(id=None), "#1", "'id'"),
    (GOOD + _entry(), "'x.one'", "'id'"),
    ('[[requirement]]\nid = "nope.nothing"\ndisabled = true\n', "'nope.nothing'", "'disabled'"),
]


@pytest.mark.parametrize(("text", "entry", "field"), BROKEN)
def test_broken_entries_name_file_entry_and_field(tmp_path, text, entry, field):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    with pytest.raises(CatalogError) as ei:
        load_catalog([str(path)])
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(str(path) + ": ")
    assert f"requirement {entry}" in msg
    assert f"field {field}" in msg


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[requirement]\nid=1", "not valid TOML"),
        ("requirement = 3\n", "array of tables"),
        ("[other]\nx = 1\n", "unknown top-level key 'other'"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_broken_files(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(CatalogError, match=words) as ei:
        load_catalog([str(path)])
    assert str(path) in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog([str(tmp_path / "absent.toml")])


def test_user_file_overrides_extends_and_disables(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text(
        _entry(id='"etcd.client"', ports='"12379"', description='"etcd, moved"')
        + _entry(id='"harbor.https"', ports='"8443"', condition='{ feature = "harbor" }')
        + '[[requirement]]\nid = "metallb.metrics.udp"\ndisabled = true\n'
    )
    cat = load_catalog([str(path)])
    ids = [r.id for r in cat]
    base = [r.id for r in CATALOG]
    assert ids.index("etcd.client") == base.index("etcd.client")  # replaced in place
    assert cat.get("etcd.client").default_ports() == [12379]
    assert cat.get("etcd.client").origin == str(path)
    assert ids[-1] == "harbor.https"
    assert "metallb.metrics.udp" not in cat and "metallb.metrics.udp" in CATALOG
    assert len(cat) == len(CATALOG)
    assert "harbor" in cat.features()
    assert cat.files[-1] == str(path)


def test_later_files_win(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(_entry(ports='"1000"'))
    b.write_text(_entry(ports='"2000"'))
    assert load_catalog([str(a), str(b)]).get("x.one").default_ports() == [2000]
    assert load_catalog([str(b), str(a)]).get("x.one").default_ports() == [1000]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_garbage_is_a_catalog_error_or_accepted(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("g") / "g.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_catalog([str(path)])
    except CatalogError as e:
        assert str(path) in str(e) and "\n" not in str(e)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ports", "proto", "dst_role", "src_roles", "condition", "sample"]),
        st.one_of(st.text(max_size=12), st.integers(), st.lists(st.text(max_size=5), max_size=3)),
        max_size=3,
    )
)
def test_garbage_fields_are_catalog_errors(tmp_path_factory, fields):
    import json

    path = tmp_path_factory.mktemp("f") / "f.toml"
    path.write_text(_entry(**{k: json.dumps(v) for k, v in fields.items()}), encoding="utf-8")
    try:
        load_catalog([str(path)])
    except CatalogError as e:
        assert "\n" not in str(e)
