"""TCP connect probe: a non-blocking connect() on a plain socket, no streams, no Task per flow.

Per attempt: socket(), connect() (EINPROGRESS), one writer callback or one timer, SO_ERROR,
close. Open sockets are closed with SO_LINGER 0 (an RST, no TIME_WAIT), so a sweep of tens of
thousands of ports does not exhaust the ephemeral port range.

States and reasons (nmap's words): open/syn-ack (or open/responder when our responder's token
arrived), closed/conn-refused (a RST), filtered/no-response, filtered/local-prohibited (our own
host's firewall refused to send).

An ICMP error is told apart from a RST: connect() reports both an ICMP port-unreachable (what
nft ``reject`` and iptables ``REJECT`` send by default) and a RST as ECONNREFUSED, and every
admin-prohibited as EHOSTUNREACH. Each socket has IP_RECVERR (IPV6_RECVERR) on, so the kernel
also queues the ICMP error itself on the socket's error queue, with its type, code and sender;
a failed connect reads it and the outcome is the one ``classify.tcp_icmp_outcome`` gives, the
function the SYN probe's ICMP path uses: filtered/port-unreach, filtered/admin-prohibited,
filtered/host-unreach, ... The same packet gets the same state and reason with or without root.

A connect to a local address whose port the kernel picked as our own source port (in the
ephemeral range, when nothing listens on it) "succeeds" by TCP simultaneous open with itself.
That is not an open port: nothing listens (the kernel never picks a port that is bound). Such
an attempt is detected (local address == peer address) and made again from another source
port, which gets the real answer (a RST); if the kernel keeps picking the same port (a one-port
ephemeral range), the outcome is closed/self-connect.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import select
import socket
import struct
import time
from collections.abc import Callable

from scanner.core.flows import Flow
from scanner.core.tags import TOKEN_LEN, tcp_token
from scanner.probes.base import (
    SELF_CONNECT,
    SELF_CONNECT_TRIES,
    Outcome,
    ProbeOptions,
    local_address,
    self_connected,
)
from scanner.probes.classify import (
    IP_RECVERR,
    IPV6_RECVERR,
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    SOL_IPV6,
    attribute,
    parse_extended_err,
    tcp_icmp_outcome,
)
from scanner.probes.deadlines import Deadlines

LINGER0 = struct.pack("ii", 1, 0)
_SOL_SOCKET = socket.SOL_SOCKET
_SO_ERROR = socket.SO_ERROR
_SO_LINGER = socket.SO_LINGER
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_EINPROGRESS = errno.EINPROGRESS
_IPPROTO_TCP = socket.IPPROTO_TCP
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_unpack_rtt = struct.Struct("I").unpack_from  # tcp_info.tcpi_rtt (microseconds) at offset 68
# tcp_info.tcpi_total_retrans (offset 100): SYNs the kernel sent again before the SYN-ACK
_unpack_retrans = struct.Struct("I").unpack_from
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_SOL_IP = socket.SOL_IP
_MSG_ERRQUEUE = socket.MSG_ERRQUEUE
# (level, option) that turns on the error queue, per address family
_RECVERR = {_AF_INET: (_SOL_IP, IP_RECVERR), _AF_INET6: (SOL_IPV6, IPV6_RECVERR)}
_RECVERR_CMSG = ((_SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR))
# How long an open port's first bytes may take to be our responder's token. The handshake is the
# kernel's; the token needs the responder process to run, and on a loaded host (many processes,
# few cores) it can be descheduled for hundreds of milliseconds: the old 0.2 s floor turned such
# ports into open/syn-ack (not ours), a false verdict. Only open ports that are not our
# responder and never speak first wait this long (nmap's NULL probe waits 6 s for a banner).
TOKEN_WAIT = 2.0

# errno -> (state, reason) for a connect that finished with an error
_ERRORS: dict[int, tuple[str, str]] = {
    errno.ECONNREFUSED: ("closed", "conn-refused"),
    errno.EHOSTUNREACH: ("filtered", "host-unreach"),
    errno.ENETUNREACH: ("filtered", "net-unreach"),
    errno.ETIMEDOUT: ("filtered", "no-response"),
    errno.EPERM: ("filtered", "local-prohibited"),
    errno.EACCES: ("filtered", "local-prohibited"),
    errno.ECONNRESET: ("closed", "reset"),
    errno.ENETDOWN: ("filtered", "net-down"),
    errno.EHOSTDOWN: ("filtered", "host-down"),
    errno.ENOPROTOOPT: ("filtered", "proto-unreach"),
}
# connect() errors an ICMP error can be behind (the kernel's icmp_err_convert table): for these
# the error queue is read, and a queued ICMP error decides the outcome
_ICMP_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EOPNOTSUPP,
        errno.EMSGSIZE,
        errno.EACCES,  # IPv6: ICMPv6 administratively prohibited (icmpv6_err_convert)
    }
)
# Resource errors: not a property of the target; the engine backs off and tries again.
RESOURCE_ERRNOS = {
    errno.EMFILE: "fd-exhausted",
    errno.ENFILE: "fd-exhausted",
    errno.ENOBUFS: "no-buffers",
    errno.EADDRNOTAVAIL: "ephemeral-exhausted",
    errno.EAGAIN: "ephemeral-exhausted",  # connect() on an exhausted port range (Linux)
}
RESOURCE_REASONS = frozenset(RESOURCE_ERRNOS.values())

_OPEN = Outcome("open", "syn-ack")
_SILENT = Outcome("filtered", "no-response", None, True)


def _done(fut: asyncio.Future, value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


_EPOLL_OUT = select.EPOLLOUT | select.EPOLLONESHOT


class TcpProber:
    """Connect probes multiplexed on one private epoll set.

    Each connecting socket is registered once (EPOLLONESHOT; closing it deregisters it), and
    the epoll descriptor itself is the only thing the event loop watches: no per-socket
    add_writer/remove_writer pair and no per-attempt loop timer, which were the two largest
    costs per flow under uvloop (measured with cProfile on a 65,535-port loopback sweep).
    """

    proto = "tcp"
    needs_raw = False
    errors = _ERRORS  # errno -> (state, reason); tcp6.py reads IPv6's EACCES differently

    def __init__(self, opts: ProbeOptions | None = None) -> None:
        self.opts = opts or ProbeOptions()
        self.secret = self.opts.secret
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ep: select.epoll | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._deadlines = Deadlines(self._expire)

    @property
    def timeout_for(self) -> Callable[[str], float] | None:
        """Set by the engine: destination -> its current adaptive timeout (seconds)."""
        return self._deadlines.timeout_for

    @timeout_for.setter
    def timeout_for(self, fn: Callable[[str], float] | None) -> None:
        self._deadlines.timeout_for = fn

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._deadlines.loop = loop
        self._ep = select.epoll()
        loop.add_reader(self._ep.fileno(), self._on_events)

    def close(self) -> None:
        if self._ep is not None and self.loop is not None:
            self.loop.remove_reader(self._ep.fileno())
            self._ep.close()
            self._ep = None
        self._deadlines.close()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(False)
        self._waiting.clear()

    def _on_events(self) -> None:
        assert self._ep is not None
        waiting = self._waiting
        for fd, _ev in self._ep.poll(0, 4096):
            fut = waiting.pop(fd, None)
            if fut is not None and not fut.done():
                fut.set_result(True)

    def _expire(self, fd: int, fut: asyncio.Future) -> None:
        self._waiting.pop(fd, None)
        fut.set_result(False)

    async def probe(self, flow: Flow, timeout: float, _try: int = 1) -> Outcome:
        loop = self.loop
        ep = self._ep
        assert loop is not None and ep is not None, "start() first"
        family = _AF_INET6 if ":" in flow.dst else _AF_INET
        try:
            sock = _socket.socket(family, _STREAM)
        except OSError as e:
            return Outcome("error", RESOURCE_ERRNOS.get(e.errno or 0, f"socket-{e.errno}"))
        sock.setsockopt(*_RECVERR[family], 1)
        if self.opts.source:
            try:
                sock.bind((self.opts.source, 0))
            except OSError as e:
                sock.close()
                return Outcome("error", f"bind-{errno.errorcode.get(e.errno or 0, e.errno)}")
        fd = sock.fileno()
        t0 = time.perf_counter()
        err = sock.connect_ex((flow.dst, flow.port))
        if err == _EINPROGRESS:
            fut = loop.create_future()
            self._waiting[fd] = fut
            ep.register(fd, _EPOLL_OUT)
            self._deadlines.add(fd, fut, t0, timeout, flow.dst)
            try:
                woke = await fut
            finally:
                self._waiting.pop(fd, None)
            # Whether the poll or the sweep came first, the socket tells the truth: a busy
            # loop may expire an attempt before it polls the already-writable socket.
            err = sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
            if err == 0 and not woke:
                try:
                    sock.getpeername()  # writable is not asked: still connecting?
                except OSError:
                    sock.close()
                    return _SILENT
        rtt = (time.perf_counter() - t0) * 1000.0
        if err == 0:
            if sock.getsockname()[1] == flow.port and self_connected(sock):
                # connected to itself (simultaneous open): nothing listens on that port; ask
                # again from another source port for the real answer
                sock.setsockopt(_SOL_SOCKET, _SO_LINGER, LINGER0)
                sock.close()
                if _try < SELF_CONNECT_TRIES:
                    return await self.probe(flow, timeout, _try + 1)
                return SELF_CONNECT
            # The kernel's own SYN/SYN-ACK RTT: our loop's queueing delay is not in it, so the
            # adaptive timeouts follow the network, not how busy this process is. And whether
            # the kernel had to send the SYN again: an attempt that outlives the kernel's 1 s
            # SYN timer (a loop late to expire it, on a busy host) is answered on the kernel's
            # retransmission, and that lost SYN must count as loss (engine: late), or a busy
            # host hides the loss from the retry estimate and gets too few retries.
            resent = False
            try:
                info = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, 104)
                rtt = _unpack_rtt(info, 68)[0] / 1000.0
                resent = _unpack_retrans(info, 100)[0] > 0
            except (OSError, struct.error):
                pass
            if self.secret is not None:
                reason = await self._read_token(sock, flow.port or 0, timeout)
                sock.setsockopt(_SOL_SOCKET, _SO_LINGER, LINGER0)
                sock.close()
                return Outcome("open", reason, rtt, resent=resent)
            sock.setsockopt(_SOL_SOCKET, _SO_LINGER, LINGER0)
            sock.close()
            return Outcome("open", "syn-ack", rtt, resent=resent)
        if err in _ICMP_ERRNOS:
            icmp = _queued_icmp(sock, flow.dst, rtt)
            if icmp is not None:
                sock.close()
                return icmp
        sock.close()
        res = RESOURCE_ERRNOS.get(err)
        if res is not None:
            return Outcome("error", res)
        state, reason = self.errors.get(err, ("error", errno.errorcode.get(err, str(err)).lower()))
        silent = reason == "no-response"
        return Outcome(state, reason, None if silent else rtt, silent)

    async def _read_token(self, sock: _socket.socket, port: int, timeout: float) -> str:
        """Read our responder's token; 'responder' when it is ours, 'syn-ack' for anything else."""
        loop = self.loop
        assert loop is not None and self.secret is not None
        want = tcp_token(self.secret, port)
        got = b""
        deadline = loop.time() + max(timeout, TOKEN_WAIT)
        fd = sock.fileno()
        while len(got) < TOKEN_LEN:
            try:
                chunk = sock.recv(TOKEN_LEN - len(got))
            except BlockingIOError:
                left = deadline - loop.time()
                if left <= 0:
                    break
                fut = loop.create_future()
                loop.add_reader(fd, _done, fut, True)
                timer = loop.call_later(left, _done, fut, False)
                try:
                    await fut
                finally:
                    loop.remove_reader(fd)
                    timer.cancel()
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        return "responder" if got == want else "syn-ack"


def _queued_icmp(sock: _socket.socket, dst: str, rtt: float) -> Outcome | None:
    """The outcome of the ICMP error queued on a failed connect's socket; None for a RST."""
    try:
        _, anc, _, _ = sock.recvmsg(0, 512, _MSG_ERRQUEUE)
    except OSError:  # nothing queued (EAGAIN): the kernel's answer was a RST or a local error
        return None
    for level, ctype, cdata in anc:
        if (level, ctype) in _RECVERR_CMSG:
            _ee_errno, origin, typ, code, offender = parse_extended_err(cdata)
            if origin != SO_EE_ORIGIN_ICMP and origin != SO_EE_ORIGIN_ICMP6:
                return None
            out = tcp_icmp_outcome(typ, code, origin == SO_EE_ORIGIN_ICMP6, rtt)
            return attribute(out, offender, dst, bool(offender) and local_address(offender))
    return None


def make_prober(opts: ProbeOptions | None = None) -> TcpProber:
    return TcpProber(opts)
