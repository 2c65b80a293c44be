"""Tags and tokens that let a prober tell *our* responder from any other service (pure).

TCP: on accept, a responder sends ``tcp_token(secret, port)`` (16 bytes); a prober holding the
same secret reads it and reports ``open`` with reason ``responder`` instead of ``syn-ack``.

UDP (and the payload of ICMP / IP-in-IP / VXLAN inner packets): a probe carries
``MAGIC + nonce(8) + mac(8)`` somewhere in its payload, mac = HMAC-SHA256(secret, b"q" + nonce).
A responder answers only datagrams that carry a valid tag, with ``MAGIC + nonce + mac'``,
mac' = HMAC(secret, b"r" + nonce): 20 bytes, never more than it received (no amplification).
"""

from __future__ import annotations

import hashlib
import hmac
import os

MAGIC = b"PMv1"
NONCE_LEN = 8
MAC_LEN = 8
TAG_LEN = len(MAGIC) + NONCE_LEN + MAC_LEN  # 20
TOKEN_LEN = 16


def _mac(secret: bytes, kind: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, kind + nonce, hashlib.sha256).digest()[:MAC_LEN]


def new_secret() -> bytes:
    return os.urandom(16).hex().encode()


def load_secret(value: str | None = None, path: str | None = None) -> bytes | None:
    """The scan secret from --secret or --secret-file (first line, stripped)."""
    if value is not None:
        return value.encode()
    if path is not None:
        with open(path, "rb") as fh:
            data = fh.read().strip().splitlines()
        return data[0].strip() if data else b""
    return None


def tcp_token(secret: bytes, port: int) -> bytes:
    return MAGIC + hmac.new(secret, b"t" + port.to_bytes(2, "big"), hashlib.sha256).digest()[:12]


def make_tag(secret: bytes, nonce: bytes) -> bytes:
    assert len(nonce) == NONCE_LEN
    return MAGIC + nonce + _mac(secret, b"q", nonce)


def find_tag(data: bytes, secret: bytes) -> bytes | None:
    """The nonce of a valid probe tag inside ``data``, or None."""
    i = data.find(MAGIC)
    while i >= 0 and i + TAG_LEN <= len(data):
        nonce = data[i + 4 : i + 4 + NONCE_LEN]
        mac = data[i + 4 + NONCE_LEN : i + TAG_LEN]
        if hmac.compare_digest(mac, _mac(secret, b"q", nonce)):
            return nonce
        i = data.find(MAGIC, i + 1)
    return None


def reply_for(secret: bytes, nonce: bytes) -> bytes:
    return MAGIC + nonce + _mac(secret, b"r", nonce)


def check_reply(data: bytes, secret: bytes) -> bytes | None:
    """The nonce of a valid responder reply (a reply starts with the tag), or None."""
    if len(data) < TAG_LEN or not data.startswith(MAGIC):
        return None
    nonce = data[4 : 4 + NONCE_LEN]
    if hmac.compare_digest(data[4 + NONCE_LEN : TAG_LEN], _mac(secret, b"r", nonce)):
        return nonce
    return None
