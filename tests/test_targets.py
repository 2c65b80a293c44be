"""Port and target specs: tables of good and bad input, Hypothesis on garbage, and the CLI's exit 2."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from scanner.core.flows import Flow
from scanner.core.ports import parse_ports
from scanner.errors import InputError
from scanner.plan.targets import (
    count_flows,
    iter_flows,
    parse_target,
    parse_targets,
    read_target_file,
)

ALL = [("tcp", p) for p in range(1, 65536)]

# ---- port specs ---------------------------------------------------------------------------------


def T(*ports: int) -> list[tuple[str, int]]:
    return [("tcp", p) for p in ports]


def U(*ports: int) -> list[tuple[str, int]]:
    return [("udp", p) for p in ports]


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("22", T(22)),
        ("22,80", T(22, 80)),
        ("80,22", T(80, 22)),  # order as typed, not sorted
        (" 22 , 80 ", T(22, 80)),
        ("1", T(1)),
        ("65535", T(65535)),
        ("6443,2379-2381", T(6443, 2379, 2380, 2381)),
        ("30000-30003", T(30000, 30001, 30002, 30003)),
        ("7-7", T(7)),
        ("-3", T(1, 2, 3)),
        ("65533-", T(65533, 65534, 65535)),
        ("22,22", T(22)),  # de-duplicated
        ("22,20-24", T(22, 20, 21, 23, 24)),  # first occurrence keeps its place
        ("24,20-24,22", T(24, 20, 21, 22, 23)),
        ("T:22", T(22)),
        ("t:22", T(22)),
        ("U:4789", U(4789)),
        ("u:53", U(53)),
        ("T:22,U:4789", T(22) + U(4789)),
        ("T:22,80,U:4789,8472", T(22, 80) + U(4789, 8472)),  # a prefix holds until the next
        ("U:53,T:53", U(53) + T(53)),  # same port, two protocols: both kept
        ("T:22,U:53,T:22", T(22) + U(53)),
        ("U:1-3", U(1, 2, 3)),
        ("T: 22", T(22)),
    ],
)
def test_parse_ports_table(spec: str, want: list[tuple[str, int]]) -> None:
    assert parse_ports(spec) == want


@pytest.mark.parametrize("spec", ["-", "1-", "-65535", "1-65535", "T:-"])
def test_every_port_spellings(spec: str) -> None:
    assert parse_ports(spec) == ALL


def test_default_proto_applies_before_any_prefix() -> None:
    assert parse_ports("53,T:22", default_proto="udp") == U(53) + T(22)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("", "empty port spec"),
        ("   ", "empty port spec"),
        ("0", "'0'"),
        ("65536", "'65536'"),
        ("99999", "'99999'"),
        ("abc", "'abc'"),
        ("22,abc", "'abc'"),
        ("22,,80", "empty item"),
        ("22,", "empty item"),
        (",22", "empty item"),
        ("80-22", "'80-22'"),
        ("0-5", "'0-5'"),
        ("5-70000", "'5-70000'"),
        ("1-2-3", "'1-2-3'"),
        ("--", "'--'"),
        ("X:22", "'X:22'"),
        ("T:", "'T:'"),
        ("U: ", "'U:'"),
        ("T:U:22", "'U:22'"),
        ("22 80", "'22 80'"),
        ("+22", "'+22'"),
        ("2.5", "'2.5'"),
        ("0x16", "'0x16'"),
        ("1e3", "'1e3'"),
    ],
)
def test_bad_port_specs_name_the_bad_token(spec: str, names: str) -> None:
    with pytest.raises(InputError) as ei:
        parse_ports(spec)
    msg = str(ei.value)
    assert names in msg
    assert "\n" not in msg


@pytest.mark.parametrize("spec", ["²", "22-²", "¹²"])
def test_unicode_superscript_digits_are_input_errors(spec: str) -> None:
    with pytest.raises(InputError):
        parse_ports(spec)


def test_non_ascii_decimal_digits_are_rejected() -> None:
    with pytest.raises(InputError):
        parse_ports("١٢")


# ---- target specs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tok", "addrs", "name"),
    [
        ("127.0.0.1", ["127.0.0.1"], None),
        (" 127.0.0.1 ", ["127.0.0.1"], None),
        ("198.18.0.7", ["198.18.0.7"], None),
        ("::1", ["::1"], None),
        ("[::1]", ["::1"], None),
        ("0:0:0:0:0:0:0:1", ["::1"], None),  # normalised
        ("FE80::1", ["fe80::1"], None),
        ("fe80::1%lo", ["fe80::1%lo"], None),
        ("127.0.0.1/32", ["127.0.0.1"], None),
        ("127.0.0.0/31", ["127.0.0.0", "127.0.0.1"], None),  # /31: both addresses, like nmap
        ("127.0.0.0/30", ["127.0.0.1", "127.0.0.2"], None),  # network and broadcast left out
        ("127.0.0.5/30", ["127.0.0.5", "127.0.0.6"], None),  # host bits ignored
        ("198.18.0.0/29", [f"198.18.0.{i}" for i in range(1, 7)], None),
        ("::1/128", ["::1"], None),
        ("::/127", ["::", "::1"], None),
        ("::/126", ["::1", "::2", "::3"], None),
        ("[::1/128]", ["::1"], None),
        ("127.0.0.1-3", ["127.0.0.1", "127.0.0.2", "127.0.0.3"], None),
        ("127.0.0,1.1", ["127.0.0.1", "127.0.1.1"], None),
        ("127.0.0-1.1", ["127.0.0.1", "127.0.1.1"], None),
        ("127.0.0.1,3,2,1", ["127.0.0.1", "127.0.0.3", "127.0.0.2"], None),
        ("127.0.0.-2", ["127.0.0.0", "127.0.0.1", "127.0.0.2"], None),
        ("127.0.0.254-", ["127.0.0.254", "127.0.0.255"], None),
        ("127.0.0.*", [f"127.0.0.{i}" for i in range(256)], None),
    ],
)
def test_parse_target_table(tok: str, addrs: list[str], name: str | None) -> None:
    t = parse_target(tok, resolve=False)
    assert list(t) == addrs
    assert t.count() == len(addrs)
    assert t.name == name


@pytest.mark.parametrize(
    ("tok", "count"),
    [
        ("10.0.0.0/8", 2**24 - 2),
        ("0.0.0.0/0", 2**32 - 2),
        ("2001:db8::/64", 2**64 - 1),
        ("10.0-255.0-255.1-254", 256 * 256 * 254),
        ("*.*.*.*", 2**32),
    ],
)
def test_large_targets_are_counted_not_expanded(tok: str, count: int) -> None:
    t = parse_target(tok, resolve=False)
    assert t.count() == count
    first = next(iter(t))
    ipaddress.ip_address(first)  # a real address, produced lazily


@pytest.mark.parametrize("tok", ["localhost", "LOCALHOST"])
def test_hostnames_resolve_once_and_keep_the_name(tok: str) -> None:
    t = parse_target(tok)
    assert t.name == tok
    assert t.count() == 1
    (addr,) = list(t)
    assert ipaddress.ip_address(addr).is_loopback


@pytest.mark.parametrize(
    "tok", ["node1", "node-1.cluster.local", "a_b.example", "x" * 63, "k8s-master-01"]
)
def test_hostname_syntax_is_accepted_without_resolving(tok: str) -> None:
    t = parse_target(tok, resolve=False)
    assert t.name == tok


@pytest.mark.parametrize(
    ("tok", "names"),
    [
        ("", "empty target"),
        ("   ", "empty target"),
        ("1.2.3.4/33", "'1.2.3.4/33'"),
        ("1.2.3.4/x", "'1.2.3.4/x'"),
        ("::1::2", "'::1::2'"),
        ("[::1", "'[::1'"),
        ("[]", "'[]'"),
        ("1.2.3.256-300", "'1.2.3.256-300'"),
        ("1.2.3.5-4", "'1.2.3.5-4'"),
        ("1.2.3.1-2-3", "'1.2.3.1-2-3'"),
        ("1.2.3.,", "'1.2.3.,'"),
        ("1.2..4", "'1.2..4'"),
        ("-node", "'-node'"),
        ("node-", "'node-'"),
        ("no de", "'no de'"),
        ("a..b", "'a..b'"),
        ("x" * 64, "'" + "x" * 64 + "'"),
        ("ex@mple", "'ex@mple'"),
        ("häst", "'häst'"),
        ("a/b", "'a/b'"),
        ("host:22", "'host:22'"),
    ],
)
def test_bad_targets_name_the_bad_token(tok: str, names: str) -> None:
    with pytest.raises(InputError) as ei:
        parse_target(tok, resolve=False)
    assert names in str(ei.value)


def test_unresolvable_hostname_is_an_input_error() -> None:
    # .invalid never resolves (RFC 2606); the resolver answers locally
    with pytest.raises(InputError, match="cannot resolve target 'nosuchhost.invalid'"):
        parse_target("nosuchhost.invalid")


def test_parse_targets_needs_one() -> None:
    with pytest.raises(InputError, match="no targets"):
        parse_targets([], resolve=False)


# ---- -iL files ----------------------------------------------------------------------------------


def test_target_file_comments_blank_lines_and_several_per_line(tmp_path: Path) -> None:
    p = tmp_path / "targets.txt"
    p.write_text(
        "# lab hosts\n"
        "127.0.0.1\n"
        "\n"
        "   127.0.0.2   # the second one\n"
        "127.0.0.3 127.0.0.4\t::1\n"
        "#127.0.0.9\n"
        "localhost#no space before the comment\n"
    )
    assert read_target_file(str(p)) == [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.4",
        "::1",
        "localhost",
    ]


def test_target_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="nope.txt"):
        read_target_file(str(missing))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="bin.txt"):
        read_target_file(str(binary))


# ---- flows --------------------------------------------------------------------------------------


def test_flows_are_port_major_and_counted_exactly() -> None:
    targets = parse_targets(["127.0.0.1", "127.0.0.2-3", "localhost"])
    ports = parse_ports("22,U:53")
    flows = list(iter_flows(targets, ports))
    assert count_flows(targets, ports) == len(flows) == 8
    assert flows[:4] == [
        Flow("127.0.0.1", 22, "tcp"),
        Flow("127.0.0.2", 22, "tcp"),
        Flow("127.0.0.3", 22, "tcp"),
        Flow("127.0.0.1", 22, "tcp", "localhost"),
    ]
    assert {f.proto for f in flows[4:]} == {"udp"}
    assert count_flows(targets, ports, extra_per_host=1) == len(
        list(iter_flows(targets, ports, extra=("icmp",)))
    )


def test_iter_flows_is_lazy() -> None:
    targets = parse_targets(["10.0.0.0/8"], resolve=False)
    flows = iter_flows(targets, ALL)
    assert next(flows) == Flow("10.0.0.1", 1)
    assert count_flows(targets, ALL) == (2**24 - 2) * 65535


# ---- garbage: Hypothesis ------------------------------------------------------------------------

PORT_PIECES = st.lists(
    st.sampled_from([*"0123456789-,:TtUuXx *\t", "65536", "65535", "T:", "U:"]), max_size=12
).map("".join)
TARGET_ALPHABET = st.sampled_from(list("0123456789abcdefx.:/-,*[]%_ ") + ["²", "é", "\x00"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=30), PORT_PIECES))
@example("T:22,,")
@example("-0")
def test_parse_ports_returns_or_raises_input_error(spec: str) -> None:
    try:
        out = parse_ports(spec)
    except InputError as e:
        assert "\n" not in str(e)
        return
    assert out and len(out) == len(set(out))
    assert all(proto in ("tcp", "udp") and 1 <= port <= 65535 for proto, port in out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=40), st.text(TARGET_ALPHABET, max_size=24)))
@example("1.2.3.4/0")
@example("[]")
def test_parse_target_returns_or_raises_input_error(tok: str) -> None:
    try:
        t = parse_target(tok, resolve=False)
    except InputError as e:
        assert "\n" not in str(e)
        return
    n = t.count()
    assert n >= 0
    for _, a in zip(range(3), t, strict=False):
        ipaddress.ip_address(a.split("%")[0])


# ---- through the CLI ----------------------------------------------------------------------------


def _scan(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scanner", "scan", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["127.0.0.1", "-p", "99999"], "99999"),
        (["127.0.0.1", "-p", "22,x"], "'x'"),
        (["127.0.0.1", "-p", "80-22"], "80-22"),
        (["127.0.0.1", "-p", "Q:1"], "Q:1"),
        (["127.0.0.1", "-p", ""], "port"),
        (["1.2.3.4/40", "-p", "22"], "1.2.3.4/40"),
        (["127.0.0.300-400", "-p", "22"], "127.0.0.300-400"),
        (["bad name", "-p", "22"], "bad name"),
        (["127.0.0.1"], "no ports"),
        (["-p", "22"], "no targets"),
        (["127.0.0.1", "-p", "22", "--frobnicate"], "--frobnicate"),
        (["127.0.0.1", "-p", "22", "--concurrency", "zero"], "zero"),
        (["127.0.0.1", "-p", "22", "--concurrency", "0"], "--concurrency"),
        (["127.0.0.1", "-p", "22", "--timeout", "-1"], "--timeout"),
        (["127.0.0.1", "-p", "22", "--only", "opn"], "opn"),
        (["127.0.0.1", "-p", "22", "--loop", "trio"], "trio"),
        (["127.0.0.1", "-p", "22", "-iL", "/nonexistent/targets"], "/nonexistent/targets"),
        (["127.0.0.1", "-p", "22", "-o", "/nonexistent/dir/out.ndjson"], "/nonexistent/dir"),
        (["127.0.0.1", "-p", "22", "--source", "me"], "'me'"),
        (["127.0.0.1", "-p", "22", "--udp-payload", "4789=bogus"], "4789=bogus"),
        (["127.0.0.1", "-p", "22", "--secret", "a", "--secret-file", "b"], "--secret"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str], names: str) -> None:
    cp = _scan(*args)
    assert cp.returncode == 2, cp.stderr
    assert cp.stdout == ""
    assert "Traceback" not in cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1, cp.stderr
    assert lines[0].startswith("portmesh: ")
    assert names in lines[0]


def test_cli_superscript_port_exits_2() -> None:
    cp = _scan("127.0.0.1", "-p", "²")
    assert "Traceback" not in cp.stderr
    assert cp.returncode == 2


def test_cli_superscript_udp_payload_port_exits_2() -> None:
    cp = _scan("127.0.0.1", "-p", "22", "--udp-payload", "²=vxlan")
    assert "Traceback" not in cp.stderr
    assert cp.returncode == 2


# Garbage that can never be valid: port specs with a letter and no ':' (no T:/U: prefix), targets
# with an '@' (no address, range or hostname has one).
NO_DIGITS = st.characters(
    blacklist_categories=("Cs", "Nd", "No", "Nl", "Cc"), blacklist_characters=":"
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    port=st.text(NO_DIGITS, min_size=1, max_size=10).filter(lambda s: any(c.isalpha() for c in s))
)
def test_cli_garbage_ports_exit_2(port: str) -> None:
    cp = _scan(f"--ports={port}", "127.0.0.1")
    assert "Traceback" not in cp.stderr
    assert cp.returncode == 2
    assert len(cp.stderr.splitlines()) == 1, cp.stderr
    assert cp.stdout == ""


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=st.text(max_size=8), b=st.text(max_size=8))
def test_cli_garbage_targets_exit_2(a: str, b: str) -> None:
    tok = (a + "@" + b).replace("\x00", "")
    cp = _scan("-p", "22", "--", tok)
    assert "Traceback" not in cp.stderr
    assert cp.returncode == 2
    assert len(cp.stderr.splitlines()) == 1, cp.stderr
    assert cp.stdout == ""


@pytest.mark.parametrize(
    ("ports", "text"),
    [
        ([], ""),
        ([22], "22"),
        ([2381, 22, 2379, 2380, 2380], "22,2379-2381"),
        (list(range(30000, 32768)), "30000-32767"),
        ([1, 3, 5, 6], "1,3,5-6"),
    ],
)
def test_ports_text_is_the_inverse_of_parse_ports(ports: list[int], text: str) -> None:
    from scanner.core.ports import ports_text

    assert ports_text(ports) == text
    if text:
        assert [p for _, p in parse_ports(text)] == sorted(set(ports))


@pytest.mark.parametrize(
    ("tok", "says"),
    [
        ("127.0.0.300", "the fourth octet '300': 300 is above 255"),
        ("127.0-300.0.1", "the second octet '0-300': 300 is above 255"),
        ("1.2.3.5-4", "the fourth octet '5-4': range '5-4' runs backwards"),
        ("1.2.3.1-2-3", "the fourth octet '1-2-3': '1-2-3' is not a number or range"),
    ],
)
def test_bad_octet_says_which_octet(tok: str, says: str) -> None:
    with pytest.raises(InputError) as ei:
        parse_target(tok, resolve=False)
    assert str(ei.value) == f"bad target {tok!r}: {says}"
