"""The witness: see our tagged probes arrive where nothing can answer them.

ICMP echo is answered by the kernel, IP-in-IP has no endpoint before the CNI is installed, and a
UDP port owned by the kernel (a VXLAN device on 4789) cannot be bound by a responder. A probe of
those that got through the firewall still arrives: the witness captures it with an AF_PACKET
socket (cooked, SOCK_DGRAM: offsets start at the IP header on any link type) behind a classic
BPF filter that passes only

    IPv4, first fragment, and (ICMP echo request | IP protocol 4 | UDP to a witnessed port)
    IPv6 (a second socket), and (ICMPv6 echo request | UDP to a witnessed port)

and reports each one whose payload carries a valid tag for the secret (``tags.find_tag``) as::

    {"type":"witness","proto":"icmp"|"ipip"|"udp","src":"198.18.7.1","dst":"198.18.7.2",
     "port":4789|null,"nonce":"<16 hex>"}

Needs CAP_NET_RAW; without it ``start`` returns the reason and the responder goes on without.
The tag search runs in user space because classic BPF cannot loop over a payload; the filter
keeps that to the few packets of the right protocol and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

from scanner.core import tags

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SO_ATTACH_FILTER = 26
PACKET_OUTGOING = 4
_MAX_UDP_PORTS = 200  # one BPF instruction per port; a classic BPF program holds 4096

# classic BPF opcodes
_LD_B_ABS = 0x30
_LD_H_ABS = 0x28
_LDX_MSH = 0xB1
_LD_B_IND = 0x50
_LD_H_IND = 0x48
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


def bpf_program(udp_ports: Iterable[int]) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) rows; offsets relative to the IP header."""
    ports = sorted(set(udp_ports))[:_MAX_UDP_PORTS]
    n = len(ports)
    # layout: 0 ldb[0]&0xf0? we rely on the socket's ETH_P_IP protocol for IPv4 only
    prog: list[tuple[int, int, int, int]] = []
    # 0: fragment offset != 0 -> reject
    prog.append((_LD_H_ABS, 0, 0, 6))
    # indexes computed below; placeholders patched after the layout is known
    prog.append((_JSET_K, 0, 0, 0x1FFF))  # 1: jt -> REJECT
    prog.append((_LD_B_ABS, 0, 0, 9))  # 2: protocol
    prog.append((_JEQ_K, 0, 0, 4))  # 3: ipip -> ACCEPT
    prog.append((_JEQ_K, 0, 0, 1))  # 4: icmp -> 6
    prog.append((_JEQ_K, 0, 0, 17))  # 5: udp -> 9, else REJECT
    prog.append((_LDX_MSH, 0, 0, 0))  # 6: x = 4 * (ip[0] & 0xf)
    prog.append((_LD_B_IND, 0, 0, 0))  # 7: icmp type
    prog.append((_JEQ_K, 0, 0, 8))  # 8: echo request -> ACCEPT else REJECT
    prog.append((_LDX_MSH, 0, 0, 0))  # 9
    prog.append((_LD_H_IND, 0, 0, 2))  # 10: udp dport
    first_port = len(prog)  # 11
    for p in ports:
        prog.append((_JEQ_K, 0, 0, p))
    reject = len(prog)
    accept = reject + 1
    prog.append((_RET_K, 0, 0, 0))
    prog.append((_RET_K, 0, 0, 0x40000))

    def rel(src: int, dst: int) -> int:
        return dst - src - 1

    prog[1] = (_JSET_K, rel(1, reject), 0, 0x1FFF)
    prog[3] = (_JEQ_K, rel(3, accept), 0, 4)
    prog[4] = (_JEQ_K, rel(4, 6), 0, 1)
    prog[5] = (_JEQ_K, rel(5, 9) if n else rel(5, reject), rel(5, reject), 17)
    prog[8] = (_JEQ_K, rel(8, accept), rel(8, reject), 8)
    for i in range(n):
        idx = first_port + i
        prog[idx] = (_JEQ_K, rel(idx, accept), 0, ports[i])
    return prog


def bpf_program6(udp_ports: Iterable[int]) -> list[tuple[int, int, int, int]]:
    """The IPv6 filter (for an ETH_P_IPV6 socket): ICMPv6 echo request or UDP to a witnessed
    port, right after the fixed header (a probe carries no extension headers)."""
    ports = sorted(set(udp_ports))[:_MAX_UDP_PORTS]
    n = len(ports)
    prog: list[tuple[int, int, int, int]] = [
        (_LD_B_ABS, 0, 0, 6),  # 0: next header
        (_JEQ_K, 0, 0, 58),  # 1: ICMPv6 -> 3
        (_JEQ_K, 0, 0, 17),  # 2: UDP -> 5, else REJECT
        (_LD_B_ABS, 0, 0, 40),  # 3: ICMPv6 type
        (_JEQ_K, 0, 0, 128),  # 4: echo request -> ACCEPT else REJECT
        (_LD_H_ABS, 0, 0, 42),  # 5: UDP destination port
    ]
    first_port = len(prog)
    prog.extend((_JEQ_K, 0, 0, p) for p in ports)
    reject = len(prog)
    accept = reject + 1
    prog.append((_RET_K, 0, 0, 0))
    prog.append((_RET_K, 0, 0, 0x40000))

    def rel(src: int, dst: int) -> int:
        return dst - src - 1

    prog[1] = (_JEQ_K, rel(1, 3), 0, 58)
    prog[2] = (_JEQ_K, rel(2, 5) if n else rel(2, reject), rel(2, reject), 17)
    prog[4] = (_JEQ_K, rel(4, accept), rel(4, reject), 128)
    for i in range(n):
        idx = first_port + i
        prog[idx] = (_JEQ_K, rel(idx, accept), 0, ports[i])
    return prog


def parse_probe6(pkt: bytes, secret: bytes) -> dict[str, Any] | None:
    """A witness record for one IPv6 packet (ICMPv6 echo or UDP), or None without a valid tag."""
    if len(pkt) < 48 or pkt[0] >> 4 != 6:
        return None
    nh = pkt[6]
    body = pkt[40:]
    port: int | None = None
    if nh == 58 and body[0] == 128:
        name = "icmp"
    elif nh == 17:
        name = "udp"
        port = struct.unpack("!H", body[2:4])[0]
        body = body[8:]
    else:
        return None
    return _record(
        name,
        body,
        secret,
        socket.inet_ntop(socket.AF_INET6, pkt[8:24]),
        socket.inet_ntop(socket.AF_INET6, pkt[24:40]),
        port,
    )


def attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    arr = (_SockFilter * len(prog))(*[_SockFilter(*row) for row in prog])
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(prog), ctypes.addressof(arr))
    # the kernel copies the program during the call; arr only has to live until it returns
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _record(
    name: str,
    body: bytes,
    secret: bytes,
    src: str,
    dst: str,
    port: int | None,
) -> dict[str, Any] | None:
    """The witness record of a probe body that carries a valid tag, else None (both families)."""
    nonce = tags.find_tag(body, secret)
    if nonce is None:
        return None
    return {
        "type": "witness",
        "proto": name,
        "src": src,
        "dst": dst,
        "port": port,
        "nonce": nonce.hex(),
    }


def parse_probe(pkt: bytes, secret: bytes) -> dict[str, Any] | None:
    """A witness record for one IPv4 packet, or None when it carries no valid tag."""
    if len(pkt) < 20 or pkt[0] >> 4 != 4:
        return None
    ihl = (pkt[0] & 0x0F) * 4
    proto = pkt[9]
    src = socket.inet_ntoa(pkt[12:16])
    dst = socket.inet_ntoa(pkt[16:20])
    body = pkt[ihl:]
    port: int | None = None
    if proto == 1:
        name = "icmp"
    elif proto == 4:
        name = "ipip"
    elif proto == 17 and len(body) >= 8:
        name = "udp"
        port = struct.unpack("!H", body[2:4])[0]
        body = body[8:]
    else:
        return None
    return _record(name, body, secret, src, dst, port)


class Witness:
    """An AF_PACKET capture of tagged probes on one event loop."""

    def __init__(
        self,
        secret: bytes,
        on_probe: Callable[[dict[str, Any]], Any],
        udp_ports: Iterable[int] = (),
    ) -> None:
        self.secret = secret
        self.on_probe = on_probe
        self.udp_ports = list(udp_ports)
        self.sock: socket.socket | None = None
        self.sock6: socket.socket | None = None  # IPv6 capture, when the host has IPv6
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> str | None:
        """Open and register the capture; return None, or why it could not (needs-cap-net-raw)."""
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        except PermissionError:
            return "needs-cap-net-raw"
        except OSError as e:
            return f"af_packet unavailable: {e.strerror or e}"
        try:
            attach_filter(s, bpf_program(self.udp_ports))
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._on_packet)
        except OSError as e:
            s.close()
            return f"cannot attach the BPF filter: {e.strerror or e}"
        self.sock = s
        self._loop = loop
        try:  # IPv6 too; a host without it is served by the IPv4 capture alone
            s6 = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6))
        except OSError:
            return None
        try:
            attach_filter(s6, bpf_program6(self.udp_ports))
            s6.setblocking(False)
            loop.add_reader(s6.fileno(), self._on_packet6)
        except OSError:
            s6.close()
            return None
        self.sock6 = s6
        return None

    def _on_packet(self) -> None:
        self._drain(self.sock, parse_probe)

    def _on_packet6(self) -> None:
        self._drain(self.sock6, parse_probe6)

    def _drain(self, s: socket.socket | None, parse: Callable[[bytes, bytes], Any]) -> None:
        """Read up to 64 captured packets and report the tagged probes among them."""
        if s is None:
            return
        for _ in range(64):
            try:
                pkt, addr = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(addr) > 2 and addr[2] == PACKET_OUTGOING:
                continue  # our own host's probes leaving
            rec = parse(pkt, self.secret)
            if rec is not None:
                self.on_probe(rec)

    def close(self) -> None:
        if self.sock6 is not None:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self.sock6.fileno())
            self.sock6.close()
            self.sock6 = None
        if self.sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
