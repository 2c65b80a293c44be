"""Kernel settings a lab needs for its size, raised on ``up`` and put back on ``down``.

Every lab host is a network namespace, but the neighbour (ARP) table and its limits are
global to the kernel: a mesh of N lab hosts needs about N x N entries at once (each host's
entry for each peer, plus the root namespace's), and the default
``net.ipv4.neigh.default.gc_thresh3`` of 1,024 is overflowed by a 35-host mesh (probes then
vanish: scanner/engine/neigh.py). So a lab raises the thresholds for the labs that exist
(their entries add up) and the last lab to go puts back what it found.

Labs are recorded machine-wide in ``/run/portmesh-kernel.json`` (not under
``PORTMESH_RUN_DIR``: two run directories share one kernel), under a lock: the original
values, and every lab (by its state directory) with its host count. A lab whose state
directory is gone (a crashed run cleaned up by hand) is dropped from the record. Values are
only ever raised above what was found, never lowered below it.

A lab made in another mount namespace (a sandbox with a private /run/portmesh, a container
sharing the kernel) has a state directory this process cannot see: the record keeps the mount
namespace each lab was made in (``mnt``), and such a lab is dropped only once no process is
left in that namespace. (Before, a `lab down` in a sandbox dropped every lab outside it and
put back the original limits under them, and the other way round.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

RECORD = Path(os.environ.get("PORTMESH_KERNEL_RECORD", "/run/portmesh-kernel.json"))
NEIGH = "/proc/sys/net/ipv4/neigh/default/gc_thresh{}"
SLACK = 1024  # entries for everything else on the machine


def entries_for(hosts: int) -> int:
    """ARP entries a lab of this size can hold at once: every host's peers, and the root's."""
    return hosts * hosts + 2 * hosts


def wanted(total_entries: int) -> dict[int, int]:
    """gc_thresh1..3 for this many lab entries (thresh2 = the entries; thresh3 twice that)."""
    n = total_entries + SLACK
    return {1: n // 2, 2: n, 3: 2 * n}


@contextlib.contextmanager
def _locked() -> Iterator[dict]:
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{RECORD}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            rec = json.loads(RECORD.read_text())
        except (OSError, ValueError):
            rec = {}
        yield rec
        if rec.get("labs"):
            tmp = RECORD.with_suffix(".tmp")
            tmp.write_text(json.dumps(rec, indent=1) + "\n")
            tmp.replace(RECORD)
        else:
            with contextlib.suppress(FileNotFoundError):
                RECORD.unlink()


def _read(k: int) -> int | None:
    try:
        return int(Path(NEIGH.format(k)).read_text())
    except (OSError, ValueError):
        return None


def _write(k: int, v: int) -> None:
    with contextlib.suppress(OSError):
        Path(NEIGH.format(k)).write_text(f"{v}\n")


def _mnt_ns() -> int | None:
    try:
        return os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return None


def _mnt_alive(ino: int) -> bool:
    """Is any process left in mount namespace ``ino``?"""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/mnt").st_ino == ino:
                    return True
    return False


def _apply(rec: dict) -> dict[int, int]:
    here = _mnt_ns()
    mnt = rec.get("mnt", {})

    def exists(path: str) -> bool:
        if Path(path).is_dir():
            return True
        ns = mnt.get(path)  # made in another mount namespace: gone once that one is
        return ns is not None and ns != here and _mnt_alive(ns)

    labs = {k: n for k, n in rec["labs"].items() if exists(k)}
    rec["labs"] = labs
    rec["mnt"] = {k: v for k, v in mnt.items() if k in labs}
    orig = {int(k): v for k, v in rec.get("original", {}).items()}
    if not labs:
        for k, v in orig.items():
            if _read(k) != v:
                _write(k, v)
        return orig
    want = wanted(sum(entries_for(n) for n in labs.values()))
    # thresh3 first when raising, last when lowering: the kernel does not check the order,
    # but 1 <= 2 <= 3 holds at every step this way
    target = {k: max(orig.get(k, 0), want[k]) for k in (1, 2, 3)}
    order = (3, 2, 1) if target[3] >= (_read(3) or 0) else (1, 2, 3)
    for k in order:
        if _read(k) != target[k]:
            _write(k, target[k])
    return target


def claim(state_dir: Path, hosts: int) -> dict[int, int]:
    """A lab of ``hosts`` hosts exists at ``state_dir``: size the kernel for every lab."""
    if _read(3) is None:
        return {}  # not Linux, or no /proc/sys here: nothing to size
    with _locked() as rec:
        if not rec.get("labs"):
            rec["original"] = {str(k): _read(k) for k in (1, 2, 3)}
        rec.setdefault("labs", {})[str(state_dir)] = hosts
        here = _mnt_ns()
        if here is not None:
            rec.setdefault("mnt", {})[str(state_dir)] = here
        return _apply(rec)


def release(state_dir: Path) -> dict[int, int]:
    """The lab at ``state_dir`` is gone: size for the rest, or put the originals back."""
    if not RECORD.exists():
        return {}
    with _locked() as rec:
        if not rec.get("labs"):
            return {}
        rec["labs"].pop(str(state_dir), None)
        return _apply(rec)
