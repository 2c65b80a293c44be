"""TCP over IPv6: the connect probe, each outcome marked ``tcp_method: connect``.

The raw SYN probe (``syn.py``) builds IPv4 packets only, so the engine sends IPv6 TCP flows
here whatever ``--method`` says; the mark keeps a run's records truthful per flow (and the
engine's summary says ``tcp_methods: {"ipv6": "connect"}``). Everything else is ``tcp.py``.
"""

from __future__ import annotations

import errno

from scanner.core.flows import Flow
from scanner.probes.base import Outcome, ProbeOptions
from scanner.probes.tcp import _ERRORS, TcpProber

METHOD = {"tcp_method": "connect"}


class Tcp6Prober(TcpProber):
    # Linux turns an ICMPv6 "administratively prohibited" (type 1 code 1, what nftables'
    # reject with icmpx admin-prohibited sends) into EACCES on the connecting socket
    # (icmpv6_err_convert), where IPv4's code 13 becomes EHOSTUNREACH: so over IPv6 connect()
    # can name it. A local output drop is EPERM and stays local-prohibited.
    errors = {**_ERRORS, errno.EACCES: ("filtered", "admin-prohibited")}

    async def probe(self, flow: Flow, timeout: float, _try: int = 1) -> Outcome:
        out = await super().probe(flow, timeout, _try)
        extra = METHOD if not out.extra else {**out.extra, **METHOD}
        return Outcome(out.state, out.reason, out.rtt_ms, out.silent, extra)


def make_prober(opts: ProbeOptions | None = None) -> Tcp6Prober:
    return Tcp6Prober(opts)
