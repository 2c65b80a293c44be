"""Payload templates, decoded back with scapy field by field."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import pytest

from scanner.core import tags
from scanner.errors import InputError
from scanner.probes import payloads

SECRET = b"s3cret"


def _tag() -> tuple[bytes, bytes]:
    nonce = payloads.new_nonce()
    return nonce, tags.make_tag(SECRET, nonce)


SRC = socket.inet_aton("198.18.0.254")
DST = socket.inet_aton("198.18.0.1")


@pytest.mark.parametrize("vni", [1, 4096, 0xFFFFFF])
def test_vxlan_template_fields(vni: int) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    nonce, tag = _tag()
    data = payloads.udp_template("vxlan", vni).render(
        tag, SRC, DST, ip_id=7, icmp_id=9, icmp_seq=11
    )
    assert data[0] == 0x08  # the I flag and nothing else
    assert data[1:4] == b"\0\0\0" and data[7] == 0
    pkt = VXLAN(data)
    assert pkt.vni == vni
    eth = pkt[Ether]
    mac0 = int(eth.src.split(":")[0], 16)
    assert mac0 & 1 == 0, "inner source MAC must be unicast"
    assert mac0 & 2 == 2, "inner source MAC must be locally administered"
    assert eth.src != "00:00:00:00:00:00"
    ip = pkt[IP]
    assert (ip.src, ip.dst, ip.id, ip.proto) == ("198.18.0.254", "198.18.0.1", 7, 1)
    icmp = pkt[ICMP]
    assert (icmp.type, icmp.id, icmp.seq) == (8, 9, 11)
    # checksums: scapy recomputes them on a fresh copy; they must equal ours.
    assert IP(bytes(ip)).chksum == IP(bytes(_without_chksum(ip))).chksum
    assert ICMP(bytes(icmp)).chksum == ICMP(bytes(_without_chksum(icmp))).chksum
    assert tags.find_tag(data, SECRET) == nonce
    assert bytes(icmp.payload).startswith(tag)


def _without_chksum(layer):
    c = layer.copy()
    c.chksum = None
    return c.__class__(bytes(c))


def test_vxlan_bad_vni() -> None:
    with pytest.raises(InputError, match="vxlan-vni"):
        payloads.udp_template("vxlan", 1 << 24)


def test_wireguard_template_fields() -> None:
    from scapy.contrib.wireguard import Wireguard, WireguardInitiation

    nonce, tag = _tag()
    data = payloads.udp_template("wireguard").render(tag)
    assert len(data) == 148
    assert data[0] == 1 and data[1:4] == b"\0\0\0"
    pkt = Wireguard(data)
    assert pkt.message_type == 1
    init = pkt[WireguardInitiation]
    assert init.sender_index == int.from_bytes(nonce[4:], "big")
    assert init.unencrypted_ephemeral[: tags.TAG_LEN] == tag
    assert tags.find_tag(data, SECRET) == nonce


def test_memberlist_template_fields() -> None:
    nonce, tag = _tag()
    data = payloads.udp_template("memberlist").render(tag)
    assert data[0] == 0  # pingMsg
    msg = _msgpack_map(data[1:])
    assert msg["SeqNo"] == int.from_bytes(nonce[4:], "big")
    assert msg["Node"] == ""
    assert msg["SourceAddr"] == tag
    assert tags.find_tag(data, SECRET) == nonce


def _msgpack_map(b: bytes) -> dict:
    """A decoder for the msgpack subset the ping uses (fixmap, fixstr, uint32, bin8)."""
    assert b[0] & 0xF0 == 0x80
    n, i, out = b[0] & 0x0F, 1, {}
    for _ in range(n):
        klen = b[i] & 0x1F
        key = b[i + 1 : i + 1 + klen].decode()
        i += 1 + klen
        t = b[i]
        if t == 0xCE:
            out[key], i = struct.unpack_from("!I", b, i + 1)[0], i + 5
        elif t & 0xE0 == 0xA0:
            ln = t & 0x1F
            out[key], i = b[i + 1 : i + 1 + ln].decode(), i + 1 + ln
        elif t == 0xC4:
            ln = b[i + 1]
            out[key], i = b[i + 2 : i + 2 + ln], i + 2 + ln
        else:
            raise AssertionError(f"unexpected msgpack type {t:#x}")
    assert i == len(b)
    return out


@pytest.mark.parametrize(
    ("kind", "length"), [("tag", tags.TAG_LEN), ("empty", 0), ("wireguard", 148)]
)
def test_lengths(kind: str, length: int) -> None:
    _, tag = _tag()
    assert len(payloads.udp_template(kind).render(tag)) == length


@pytest.mark.parametrize("kind", ["vxlan", "wireguard", "memberlist", "tag"])
def test_every_tagged_kind_carries_the_tag(kind: str) -> None:
    nonce, tag = _tag()
    assert tags.find_tag(payloads.udp_template(kind).render(tag, SRC, DST), SECRET) == nonce


def test_unknown_kind() -> None:
    with pytest.raises(InputError, match="unknown UDP payload kind"):
        payloads.udp_template("dns")


@pytest.mark.parametrize(
    ("port", "overrides", "kind"),
    [
        (4789, None, "vxlan"),
        (8472, None, "vxlan"),
        (51820, None, "wireguard"),
        (51821, None, "wireguard"),
        (51871, None, "wireguard"),
        (7946, None, "memberlist"),
        (53, None, "tag"),
        (4789, {4789: "tag"}, "tag"),
        (9999, {9999: "empty"}, "empty"),
    ],
)
def test_kind_for_port(port: int, overrides: dict | None, kind: str) -> None:
    assert payloads.kind_for_port(port, overrides) == kind


def test_echo_render() -> None:
    from scapy.layers.inet import ICMP

    nonce, tag = _tag()
    data = payloads.render_echo(payloads.icmp_echo_template(), tag, 0x1234, 0xFFFF)
    pkt = ICMP(data)
    assert (pkt.type, pkt.code, pkt.id, pkt.seq) == (8, 0, 0x1234, 0xFFFF)
    assert payloads.checksum(data) == 0
    assert len(data) == 8 + payloads.ECHO_PAYLOAD_LEN
    assert tags.find_tag(data, SECRET) == nonce


def test_ipip_inner() -> None:
    from scapy.layers.inet import ICMP, IP

    nonce, tag = _tag()
    data = payloads.ipip_template().render(tag, SRC, DST, ip_id=0xBEEF, icmp_id=3, icmp_seq=4)
    ip = IP(data)
    assert (ip.version, ip.src, ip.dst, ip.id, ip.proto, ip.len) == (
        4,
        "198.18.0.254",
        "198.18.0.1",
        0xBEEF,
        1,
        len(data),
    )
    assert payloads.checksum(data[:20]) == 0
    assert payloads.checksum(data[20:]) == 0
    assert (ip[ICMP].id, ip[ICMP].seq) == (3, 4)
    assert tags.find_tag(data, SECRET) == nonce


@pytest.mark.parametrize(
    ("data", "csum"),
    [(b"", 0xFFFF), (b"\x00\x01", 0xFFFE), (b"\xff\xff", 0), (b"\x01", 0xFEFF)],
)
def test_checksum_table(data: bytes, csum: int) -> None:
    assert payloads.checksum(data) == csum


def test_nonces_unique() -> None:
    seen = {payloads.new_nonce() for _ in range(10000)}
    assert len(seen) == 10000
    assert all(len(n) == tags.NONCE_LEN for n in seen)


def test_import_does_not_load_scapy() -> None:
    code = (
        "import sys; import scanner.probes.payloads, scanner.probes.udp, scanner.probes.icmp, "
        "scanner.probes.ipip; print('scapy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ipip_outer() -> None:
    from scapy.layers.inet import ICMP, IP

    nonce, tag = _tag()
    tpl = payloads.ipip_outer_template()
    data = tpl.render(tag, SRC, DST, ip_id=5, icmp_id=6, icmp_seq=7)
    outer = IP(data)
    assert (outer.proto, outer.len, outer.src, outer.id, outer.chksum) == (
        4,
        len(data),
        "0.0.0.0",  # filled in by the kernel
        0,
        0,
    )
    inner = IP(data[20:])
    assert (inner.src, inner.dst, inner.id) == ("198.18.0.254", "198.18.0.1", 5)
    assert (inner[ICMP].type, inner[ICMP].id, inner[ICMP].seq) == (8, 6, 7)
    assert payloads.checksum(data[20:40]) == 0
    assert tags.find_tag(data, SECRET) == nonce


def _scapy_templates(vni: int) -> dict[str, bytes]:
    """The templates as scapy builds them (the builders payloads.py had before issue 16)."""
    from scapy.contrib.wireguard import Wireguard, WireguardInitiation
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN
    from scapy.packet import Raw

    echo = payloads._echo_payload()

    def inner():
        ip = IP(src="0.0.0.0", dst="0.0.0.0", ttl=64, id=0, flags=0)
        return ip / ICMP(type=8, code=0, id=0, seq=0) / Raw(echo)

    outer = bytearray(bytes(IP(src="0.0.0.0", dst="0.0.0.0", proto=4, ttl=64, id=0, flags=0)
                            / inner()))  # fmt: skip
    outer[10:12] = b"\0\0"
    wg = Wireguard(message_type=1, reserved_zero=0) / WireguardInitiation(
        sender_index=0,
        unencrypted_ephemeral=bytes(32),
        encrypted_static=b"\x5a" * 48,
        encrypted_timestamp=b"\xa5" * 28,
        mac1=bytes(16),
        mac2=bytes(16),
    )
    vx = VXLAN(flags=0x08, vni=vni) / Ether(
        src=payloads.INNER_SRC_MAC, dst=payloads.INNER_DST_MAC
    ) / inner()  # fmt: skip
    return {
        "vxlan": bytes(vx),
        "wireguard": bytes(wg),
        "icmp-echo": bytes(ICMP(type=8, code=0, id=0, seq=0) / Raw(echo)),
        "ipip": bytes(inner()),
        "ipip-outer": bytes(outer),
    }


@pytest.mark.parametrize("vni", [0, 4096, 0xFFFFFF])
def test_struct_templates_equal_scapys_build_byte_for_byte(vni: int) -> None:
    # the templates are packed with struct (no scapy import in the probe path): scapy is the
    # oracle for every byte, checksums included
    want = _scapy_templates(vni)
    got = {
        "vxlan": payloads.udp_template("vxlan", vni).data,
        "wireguard": payloads.udp_template("wireguard").data,
        "icmp-echo": payloads.icmp_echo_template().data,
        "ipip": payloads.ipip_template().data,
        "ipip-outer": payloads.ipip_outer_template().data,
    }
    assert got == want


def test_building_every_template_does_not_load_scapy() -> None:
    code = (
        "import sys; from scanner.probes import payloads as p; "
        "[p.udp_template(k) for k in p.KINDS]; p.icmp_echo_template(); p.ipip_template(); "
        "p.ipip_outer_template(); print('scapy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
