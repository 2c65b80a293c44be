"""Flush a lab host's connection tracking table (ctnetlink; no ``conntrack`` tool needed).

The lab's fault rules match only a connection's first packet (``ct state new``). A conntrack
entry left by a flow from before the faults were applied (the same 5-tuple: a fixed source
port, or an ephemeral port the kernel hands out again within the entry's 30-120 s timeout)
makes a later packet ``established``, and it passes the new fault. ``Lab.apply_faults`` loads
the rules, then flushes every lab host's table with this: from then on each flow's first
packet meets the rules.

The flush is one netlink message: ``IPCTNL_MSG_CT_DELETE`` (subsystem ctnetlink) without a
tuple attribute deletes every entry, and family ``AF_UNSPEC`` means IPv4 and IPv6. The socket
is opened inside the host's namespace: the calling thread enters it (setns), opens the
socket, and goes back at once; a netlink socket stays bound to the namespace it was made in.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NFNETLINK_V0 = 0
CLONE_NEWNET = 0x40000000

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, 0 here)


def flush_request(seq: int = 1) -> bytes:
    """The netlink message that deletes every conntrack entry of a namespace (pure)."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
    )


def parse_ack(data: bytes, seq: int = 1) -> int:
    """The errno of the kernel's answer to ``flush_request`` (0: done); ValueError if it is none."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_ERROR and got_seq == seq and length >= _NLMSGHDR.size + 4:
            (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
            return -err
        off += (length + 3) & ~3
    raise ValueError("no netlink acknowledgement in the kernel's answer")


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netlink_socket_in(ns: str, protocol: int) -> socket.socket:
    """A netlink socket of ``protocol`` inside the named network namespace (/run/netns/NS).

    Only the calling thread changes namespace, and only for the ``socket()`` call.
    """
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(there)
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
            finally:
                _setns(here)  # back before anything else runs on this thread
        finally:
            os.close(there)
    finally:
        os.close(here)


def flush(ns: str, timeout: float = 5.0) -> None:
    """Delete every conntrack entry (IPv4 and IPv6) in the named network namespace.

    OSError if the kernel refuses (no ctnetlink: ENOENT / EPROTONOSUPPORT, ...) or does not
    answer in time.
    """
    with netlink_socket_in(ns, NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        s.bind((0, 0))
        s.send(flush_request(1))
        err = parse_ack(s.recv(65536), 1)
    if err:
        raise OSError(err, f"conntrack flush in {ns}: {os.strerror(err)}")
