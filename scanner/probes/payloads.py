"""Probe payloads: packets packed ONCE into byte templates with struct, patched per probe (pure).

The templates are packed by hand (a few fixed headers), not with scapy: importing scapy costs
0.5-1.2 s, and a UDP prober started in the middle of a mesh agent's SYN sweep stalled its event
loop that long (issue 16; cProfile of an agent). tests/test_payloads.py checks every template
byte for byte against scapy's build of the same packet. Each template is built once per process
(``functools.lru_cache``) and the hot path only copies the template and writes the tag
(``MAGIC + nonce + mac``, see ``scanner.core.tags``), a few nonce-derived fields and, for the
packets that carry an inner IPv4 packet, the inner addresses and checksums.

Kinds (``ProbeOptions.udp_payloads`` names them per port):

- ``vxlan``: RFC 7348 header with the flags byte exactly 0x08 (the I bit; the Linux driver counts
  any other unknown flag bit as an rx error), the VNI, then an inner Ethernet frame (source a
  unicast, locally administered MAC, destination broadcast so a decapsulating host hands it to its
  stack) carrying IPv4/ICMP echo from our address to the far host's, whose payload is the tag.
- ``wireguard``: a handshake-initiation-shaped message: type 1, three reserved zero bytes, the
  sender index (little endian) = the nonce's last 4 bytes, the tag inside the 32-byte unencrypted
  ephemeral field; 148 bytes. Its MAC1 is not valid, so a WireGuard peer drops it silently: the
  port is never "closed", which is what we want to prove (no ICMP port unreachable).
- ``memberlist``: hashicorp/memberlist's ping: message type byte 0 (pingMsg) then a msgpack map
  ``{"SeqNo": uint32, "Node": "", "SourceAddr": <tag>}``; an empty Node skips the name check and,
  without SourcePort, a memberlist peer without gossip encryption acks to the packet's source.
- ``tag``: the 20-byte tag alone. ``empty``: a zero-length datagram (no tag).
"""

from __future__ import annotations

import functools
import itertools
import os
import struct
from dataclasses import dataclass

from scanner.core.tags import MAGIC, NONCE_LEN, TAG_LEN
from scanner.errors import InputError

KINDS = ("vxlan", "wireguard", "memberlist", "tag", "empty")

# Which payload a UDP port gets when the user does not say.
DEFAULT_PORT_KINDS: dict[int, str] = {
    4789: "vxlan",  # Calico VXLAN, the IANA port
    8472: "vxlan",  # Flannel / Cilium VXLAN (the Linux kernel's historic default)
    51820: "wireguard",  # Calico / Cilium / plain WireGuard, IPv4
    51821: "wireguard",  # Calico WireGuard, IPv6
    51871: "wireguard",  # Cilium WireGuard
    7946: "memberlist",  # MetalLB speakers
}

DEFAULT_VNI = 4096  # Calico's default VXLAN VNI
# A unicast (bit 0 clear), locally administered (bit 1 set) source MAC for inner frames.
INNER_SRC_MAC = "02:50:4d:00:00:01"
INNER_DST_MAC = "ff:ff:ff:ff:ff:ff"
# An echo payload as long as ping's default (56 bytes): the tag, then a fixed pad.
ECHO_PAYLOAD_LEN = 56

_prefix = os.urandom(NONCE_LEN - 4)
_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_nonce() -> bytes:
    """A per-probe nonce: a random per-process prefix and a counter (unique for 2**32 probes)."""
    return _prefix + (next(_counter) & 0xFFFFFFFF).to_bytes(4, "big")


def kind_for_port(port: int, overrides: dict[int, str] | None = None) -> str:
    if overrides and port in overrides:
        return overrides[port]
    return DEFAULT_PORT_KINDS.get(port, "tag")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


@dataclass(frozen=True, slots=True)
class Template:
    """Prebuilt packet bytes and where the per-probe fields go.

    tag_off: where the 20-byte tag goes (None: no tag, the ``empty`` kind).
    nonce4: offsets that get the nonce's last 4 bytes (format, offset) with format "<I" or "!I".
    ip_off: offset of an inner IPv4 header followed by ICMP (None when there is none).
    """

    kind: str
    data: bytes
    tag_off: int | None = None
    nonce4: tuple[tuple[str, int], ...] = ()
    ip_off: int | None = None

    def render(
        self,
        tag: bytes,
        src: bytes | None = None,
        dst: bytes | None = None,
        ip_id: int = 0,
        icmp_id: int = 0,
        icmp_seq: int = 0,
    ) -> bytes:
        """The packet for one probe. ``src``/``dst`` are packed IPv4 addresses of the inner packet."""
        buf = bytearray(self.data)
        if self.tag_off is not None:
            buf[self.tag_off : self.tag_off + TAG_LEN] = tag
        if self.nonce4:
            low = int.from_bytes(tag[len(MAGIC) + NONCE_LEN - 4 : len(MAGIC) + NONCE_LEN], "big")
            for fmt, off in self.nonce4:
                struct.pack_into(fmt, buf, off, low)
        if self.ip_off is not None:
            _fix_inner(buf, self.ip_off, src, dst, ip_id, icmp_id, icmp_seq)
        return bytes(buf)


def _fix_inner(
    buf: bytearray,
    ip: int,
    src: bytes | None,
    dst: bytes | None,
    ip_id: int,
    icmp_id: int,
    icmp_seq: int,
) -> None:
    ihl = (buf[ip] & 0x0F) * 4
    struct.pack_into("!H", buf, ip + 4, ip_id & 0xFFFF)
    if src is not None:
        buf[ip + 12 : ip + 16] = src
    if dst is not None:
        buf[ip + 16 : ip + 20] = dst
    struct.pack_into("!H", buf, ip + 10, 0)
    struct.pack_into("!H", buf, ip + 10, checksum(buf[ip : ip + ihl]))
    total = struct.unpack_from("!H", buf, ip + 2)[0]
    icmp = ip + ihl
    struct.pack_into("!HHH", buf, icmp + 2, 0, icmp_id & 0xFFFF, icmp_seq & 0xFFFF)
    struct.pack_into("!H", buf, icmp + 2, checksum(buf[icmp : ip + total]))


def _echo_payload() -> bytes:
    """Tag placeholder (zeros) then a recognisable pad, ECHO_PAYLOAD_LEN bytes."""
    pad = b"portmesh-probe-" * 4
    return bytes(TAG_LEN) + pad[: ECHO_PAYLOAD_LEN - TAG_LEN]


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ipv4_header(payload_len: int, proto: int, ttl: int = 64, csum: bool = True) -> bytes:
    """An IPv4 header without options: version 4, IHL 5, TOS 0, id 0, no flags, addresses
    0.0.0.0 (patched per probe), the header checksum computed unless ``csum`` is False."""
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0, ttl, proto, 0,
                      bytes(4), bytes(4))  # fmt: skip
    if not csum:
        return hdr
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]


def _icmp_echo() -> bytes:
    """ICMP echo request (type 8, code 0, id 0, seq 0) with the tag placeholder payload and its
    checksum."""
    body = struct.pack("!BBHHH", 8, 0, 0, 0, 0) + _echo_payload()
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def _inner_ipv4_icmp() -> bytes:
    """IPv4 (0.0.0.0 -> 0.0.0.0, TTL 64, id 0) / ICMP echo whose payload starts with the tag
    placeholder: the bytes scapy builds for the same packet."""
    icmp = _icmp_echo()
    return _ipv4_header(len(icmp), 1) + icmp


@functools.lru_cache(maxsize=64)
def udp_template(kind: str, vni: int = DEFAULT_VNI) -> Template:
    """The UDP payload template of one kind (built once per process)."""
    if kind == "tag":
        return Template(kind, bytes(TAG_LEN), tag_off=0)
    if kind == "empty":
        return Template(kind, b"")
    if kind == "vxlan":
        if not 0 <= vni < 1 << 24:
            raise InputError(f"--vxlan-vni: {vni} is out of range 0-16777215")
        # VXLAN: flags 0x08 (I), 3 reserved bytes, the 24-bit VNI, 1 reserved byte; then the
        # inner Ethernet frame (destination, source, type IPv4)
        data = (
            struct.pack("!B3xI", 0x08, vni << 8)
            + _mac(INNER_DST_MAC) + _mac(INNER_SRC_MAC) + b"\x08\x00"
            + _inner_ipv4_icmp()
        )  # fmt: skip
        ip_off = 8 + 14
        return Template(kind, data, tag_off=ip_off + 20 + 8, ip_off=ip_off)
    if kind == "wireguard":
        # handshake initiation: type 1, 3 reserved zero bytes, sender index (little endian),
        # unencrypted ephemeral (32), encrypted static (48), encrypted timestamp (28), mac1 and
        # mac2 (16 each): 148 bytes
        data = (
            struct.pack("<B3xI", 1, 0) + bytes(32) + b"\x5a" * 48 + b"\xa5" * 28 + bytes(16)
            + bytes(16)
        )  # fmt: skip
        # type(1) reserved(3) sender_index(4) then the ephemeral key: the tag at its start.
        return Template(kind, data, tag_off=8, nonce4=(("<I", 4),))
    if kind == "memberlist":
        return _memberlist_template()
    raise InputError(f"unknown UDP payload kind {kind!r} (expected one of {', '.join(KINDS)})")


def _memberlist_template() -> Template:
    # pingMsg = 0, then msgpack (go-codec MsgpackHandle encodes structs as maps keyed by field name).
    # SeqNo is written as a fixed-width uint32 (0xce) so the hot path can patch it in place.
    body = bytearray(b"\x00")
    body += b"\x83"  # fixmap, 3 entries
    body += b"\xa5SeqNo" + b"\xce" + bytes(4)
    seq_off = len(body) - 4
    body += b"\xa4Node" + b"\xa0"
    body += b"\xaaSourceAddr" + b"\xc4" + bytes([TAG_LEN])
    tag_off = len(body)
    body += bytes(TAG_LEN)
    return Template("memberlist", bytes(body), tag_off=tag_off, nonce4=(("!I", seq_off),))


@functools.lru_cache(maxsize=4)
def icmp_echo_template() -> Template:
    """An ICMP echo request (header + payload, no IP header) for icmp.py: tag at offset 8."""
    return Template("icmp-echo", _icmp_echo(), tag_off=8)


def render_echo(tpl: Template, tag: bytes, ident: int, seq: int) -> bytes:
    """An ICMP echo request with id/seq/tag and a valid checksum."""
    buf = bytearray(tpl.data)
    buf[8 : 8 + TAG_LEN] = tag
    struct.pack_into("!HHH", buf, 2, 0, ident & 0xFFFF, seq & 0xFFFF)
    struct.pack_into("!H", buf, 2, checksum(buf))
    return bytes(buf)


@functools.lru_cache(maxsize=4)
def ipip_template() -> Template:
    """The inner packet of an IP-in-IP probe: IPv4 (our address -> far host) / ICMP echo / tag."""
    return Template("ipip", _inner_ipv4_icmp(), tag_off=28, ip_off=0)


@functools.lru_cache(maxsize=4)
def ipip_outer_template() -> Template:
    """A whole IP-in-IP packet for an IPPROTO_RAW socket: outer IPv4 (protocol 4, source, id and
    checksum left zero for the kernel to fill), then ``ipip_template``'s inner packet. The outer
    destination is at offset 16; the inner packet at offset 20."""
    inner = _inner_ipv4_icmp()
    # the outer checksum left zero: the kernel computes it (IP_HDRINCL)
    data = _ipv4_header(len(inner), 4, csum=False) + inner
    return Template("ipip-outer", data, tag_off=20 + 28, ip_off=20)
