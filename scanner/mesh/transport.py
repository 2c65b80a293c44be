"""How a command reaches a host: the exec template, and the optional wheel bundle.

The template is split like a shell would (``shlex``) and ``{name}``, ``{address}``, ``{user}``
and ``{cluster}`` are substituted inside each word, so an address or a name can never become a second
word or an option. The agent command follows the template's words:

    ip netns exec pm-{name}            + ["portmesh", "agent"]      (exec'd as is)
    ssh -o BatchMode=yes {address}     + ["portmesh agent"]         (one word: ssh hands it to
                                                                      the remote shell, which
                                                                      splits it back)

When the template's program is ``ssh`` the agent command is joined with ``shlex.join``, so the
remote shell sees exactly the words we meant; any other program gets the words themselves.

Air-gapped hosts (``--bundle DIR``): DIR holds wheels (``pip wheel . -w DIR`` for portmesh and
``pip download -d DIR ...`` for its dependencies, built for the hosts' Python and platform).
The agent command becomes ``python3 -c BOOTSTRAP``; the coordinator writes one header line
(the payload's length) and the wheels as an uncompressed tar, base64, to the agent's stdin
before the first control message. The bootstrap reads exactly that many bytes (``os.read`` on
fd 0, no buffering, so the control channel that follows is untouched), unpacks every wheel
into a fresh temporary directory, runs ``python -m scanner agent`` from there with the same
stdin and stdout, and removes the directory when the agent exits. Nothing is installed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson

from scanner.errors import InputError

DEFAULT_SSH = "ssh -o BatchMode=yes {address}"
DEFAULT_SSH_USER = "ssh -o BatchMode=yes {user}@{address}"
DEFAULT_AGENT_CMD = "portmesh agent"
# Programs that run their command on this machine, with this machine's files: the agent can be
# this very interpreter and package (an unactivated venv works). ssh, kubectl exec, docker exec
# reach another filesystem, where `portmesh agent` must be installed (or --bundle used).
LOCAL_PROGRAMS = frozenset({"ip", "nsenter", "sudo", "doas", "env", "unshare", "runuser", "setpriv"})
PLACEHOLDERS = ("name", "address", "user", "cluster")
_FIELD = re.compile(r"\{([^{}]*)\}")
READ_LIMIT = 64 << 20  # longest line read from an agent (a result line is ~300 bytes)
# what the coordinator buffers per agent before the pipe pushes back (asyncio pauses reading
# at twice the limit, plus one pipe read of at most 64 KiB): ~100 KiB x 1,000 agents, however
# far behind the coordinator falls
READ_BUFFER = 1 << 14
LONG_LINES = 8  # lines longer than a read gathered at once (ndjson_chunks' gate)


def check_template(template: str) -> list[str]:
    """Split and validate a template (InputError on bad quoting or unknown placeholders)."""
    try:
        words = shlex.split(template)
    except ValueError as e:
        raise InputError(f"--exec {template!r}: {e}") from None
    if not words:
        raise InputError("--exec: the template is empty")
    for w in words:
        for m in _FIELD.finditer(w):
            if m.group(1) not in PLACEHOLDERS:
                raise InputError(
                    f"--exec {template!r}: unknown placeholder {{{m.group(1)}}} "
                    f"(use {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
                )
    return words


def default_template(user: str | None) -> str:
    return DEFAULT_SSH_USER if user else DEFAULT_SSH


def render(
    template: str, name: str, address: str, user: str | None, cluster: str | None = None
) -> list[str]:
    """The template's words with the placeholders filled (no word is ever split).

    ``name`` is the inventory name (``node1``, also for ``node1@worker-a``), ``cluster`` the
    host's cluster (empty for the bootstrap node)."""
    values = {"name": name, "address": address, "user": user or "", "cluster": cluster or ""}
    if user is None and any("{user}" in w for w in check_template(template)):
        raise InputError(f"--exec uses {{user}} but host {name!r} has no ansible_user")
    return [_FIELD.sub(lambda m: values[m.group(1)], w) for w in check_template(template)]


def is_remote_shell(argv: Sequence[str]) -> bool:
    """Does this program hand its trailing words to a remote shell (ssh does)?"""
    return bool(argv) and os.path.basename(argv[0]) == "ssh"


def is_local(argv: Sequence[str]) -> bool:
    """Does this template run its command on this machine (ip netns exec, nsenter, sudo...)?"""
    return bool(argv) and os.path.basename(argv[0]) in LOCAL_PROGRAMS


def agent_words(prefix: Sequence[str], agent_cmd: str | None) -> list[str]:
    """The agent command for one host. ``None`` (no --agent-cmd): through a local template this
    interpreter and package (``sys.executable -m scanner agent``), else ``portmesh agent``."""
    if agent_cmd is None:
        if is_local(prefix):
            return [sys.executable, "-m", "scanner", "agent"]
        agent_cmd = DEFAULT_AGENT_CMD
    return check_template(agent_cmd)


def start_hint(prefix: Sequence[str], agent: Sequence[str], code: int | None, tail: str) -> str:
    """What to do when an agent could not even start (no hello): "" when it is not that."""
    text = tail.lower()
    if is_remote_shell(prefix) and code == 255:
        return ""  # ssh's own failure (auth, host key, network): its message says it all
    missing = code in (126, 127) or any(
        w in text for w in ("not found", "no such file", "exec of", "no module named")
    )
    if not missing:
        return ""
    what = shlex.join(agent)
    if is_remote_shell(prefix):
        return (
            f"; {what!r} did not start on the host: install portmesh there, give its path with "
            "--agent-cmd '/path/to/venv/bin/portmesh agent', or copy it over the channel with "
            "--bundle DIR (docs/mesh.md)"
        )
    return (
        f"; {what!r} did not start: give the agent's full path with --agent-cmd "
        "'/path/to/venv/bin/portmesh agent' (or --bundle DIR for hosts without portmesh)"
    )


def command_argv(prefix: list[str], agent_argv: list[str]) -> list[str]:
    if is_remote_shell(prefix):
        return [*prefix, shlex.join(agent_argv)]
    return [*prefix, *agent_argv]


async def start(argv: list[str]) -> asyncio.subprocess.Process:
    """Start the exec channel: stdin/stdout pipes for the protocol, stderr kept for reasons.

    A session of its own: a Ctrl-C at the terminal reaches the coordinator only, which stops the
    agents through the protocol instead of having them killed mid-line.
    """
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        limit=READ_BUFFER,
    )


# ---- the bundle ----------------------------------------------------------------------------

BOOTSTRAP = r"""
import os, sys, shutil, subprocess, tempfile, zipfile, tarfile, io, base64
def rd(n):
    b = bytearray()
    while len(b) < n:
        c = os.read(0, min(n - len(b), 1 << 20))
        if not c:
            sys.stderr.write("portmesh bootstrap: the bundle was cut short\n"); sys.exit(3)
        b += c
    return bytes(b)
h = bytearray()
while not h.endswith(b"\n"):
    c = os.read(0, 1)
    if not c:
        sys.stderr.write("portmesh bootstrap: no bundle header\n"); sys.exit(3)
    h += c
n = int(h)
d = tempfile.mkdtemp(prefix="portmesh-bundle-")
try:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(rd(n))), mode="r:") as t:
        for m in t.getmembers():
            if m.isfile() and m.name.endswith(".whl") and "/" not in m.name:
                with zipfile.ZipFile(io.BytesIO(t.extractfile(m).read())) as z:
                    for zi in z.infolist():
                        p = os.path.normpath(zi.filename)
                        if p.startswith("..") or os.path.isabs(p):
                            continue
                        z.extract(zi, d)
    env = dict(os.environ, PYTHONPATH=d + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc = subprocess.call([sys.executable, "-m", "scanner", "agent"], env=env)
finally:
    shutil.rmtree(d, ignore_errors=True)
sys.exit(rc)
"""


def bootstrap_argv(python: str = "python3") -> list[str]:
    code = base64.b64encode(BOOTSTRAP.encode()).decode()
    return [python, "-c", f"import base64;exec(base64.b64decode('{code}'))"]


def bundle_payload(directory: str) -> bytes:
    """Header line + base64 of an uncompressed tar of DIR/*.whl (InputError if there are none)."""
    try:
        names = sorted(f for f in os.listdir(directory) if f.endswith(".whl"))
    except OSError as e:
        raise InputError(f"--bundle {directory}: {e.strerror or e}") from None
    if not any(n.startswith("portmesh-") for n in names):
        raise InputError(
            f"--bundle {directory}: no portmesh wheel (*.whl) in it; "
            f"build one with: pip wheel . --no-deps -w {directory}"
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as t:
        for n in names:
            t.add(os.path.join(directory, n), arcname=n)
    data = base64.b64encode(buf.getvalue())
    return str(len(data)).encode() + b"\n" + data


async def ndjson_records(
    stream: asyncio.StreamReader,
) -> AsyncIterator[tuple[dict[str, Any], bytes]]:
    """(record, raw line) for every JSON object line of a child's stdout, until end of file.

    Over-long lines (past the reader's limit), lines that are not JSON and JSON that is not an
    object are skipped: a peer's garbage never ends the reader.
    """
    while True:
        try:
            line = await stream.readline()
        except (ValueError, asyncio.LimitOverrunError):
            continue
        if not line:
            return
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield rec, line


async def ndjson_chunks(
    stream: asyncio.StreamReader,
    limit: int = READ_LIMIT,
    chunk: int = 1 << 16,
    gate: asyncio.Semaphore | None = None,
) -> AsyncIterator[bytes]:
    """The complete lines of a child's stdout, a read at a time, as the bytes they are (each
    chunk ends with a newline; parsing is the caller's).

    One await per 64 KiB instead of one per line (a result line is ~300 bytes): the
    coordinator of a 1,000-host mesh reads 26 million lines, and forwards most of them
    without splitting them (blocks of passing results, wire.PassBlocks). Only raw bytes are
    held between reads (no parsed records: a thousand agents' batches would add up). A line
    longer than ``limit`` is dropped, up to its newline.

    A line longer than a read (an agent's ``done`` with its tallies: ~2 MB at 1,000 hosts)
    is kept as its reads and joined once, not copied again at every read; with ``gate``, a
    semaphore shared by the agents, only that many such lines are gathered at once and the
    other agents wait in their pipes (1,000 agents ending together, read in turn, held 1,000
    partial lines: 2 GB).
    """
    parts: list[bytes] = []  # the reads of the line not complete yet
    size = 0
    skipping = False
    held = False
    try:
        while True:
            data = await stream.read(chunk)
            if not data:
                return
            cut = data.rfind(b"\n")
            if cut < 0:
                if not skipping:
                    size += len(data)
                    if size > limit:
                        parts, size, skipping = [], 0, True
                    else:
                        parts.append(data)
                if gate is not None:
                    if skipping and held:
                        gate.release()
                        held = False
                    elif not skipping and not held:
                        await gate.acquire()  # a long line: gather it when its turn comes
                        held = True
                continue
            if parts:
                parts.append(data)
                cut += size
                data = b"".join(parts)
            rest = data[cut + 1 :]
            whole = data[: cut + 1] if rest else data
            del data
            if skipping:
                whole = whole[whole.find(b"\n") + 1 :]  # the tail of an over-long line
                skipping = False
            parts, size = ([rest], len(rest)) if rest else ([], 0)
            if size > limit:
                parts, size, skipping = [], 0, True
            if held:
                gate.release()  # type: ignore[union-attr]
                held = False
            yield whole
            # not kept while waiting for the next read: an agent that has said done waits
            # for the stop phase with its last read (its done line, ~2 MB at 1,000 hosts)
            del whole
    finally:
        if held:
            gate.release()  # type: ignore[union-attr]
