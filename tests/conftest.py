"""Shared fixtures.

Lab fixtures (real network namespaces, real nftables; skipped with a reason when not root or
when ``ip`` / ``nft`` are missing):

  make_lab       function-scoped factory: ``make_lab(hosts=2, names=None, host_link=True)``
                 -> scanner.lab.netns.Lab with a unique name; every lab it made is torn down after
                 the test, pass or fail.
  module_lab     the same factory, module-scoped (one lab shared by a module's tests).
  lab            a ready 2-host lab (node1, node2) with a host link, function-scoped.
  lab_name       a unique lab name for a test that calls Lab.up itself; whatever is left of
                 a lab by that name is cleaned up after the test.

Helpers (module functions; tests should prefer the fixtures):

  lab_skip_reason() -> str | None   why lab tests cannot run here (None: they can)
  unique_lab_name() -> str          a lab name no other test run on this machine uses
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

_counter = itertools.count(1)


def lab_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"lab tests need the {tool!r} command"
    return None


def unique_lab_name() -> str:
    # pid + counter + 2 random bytes: unique among concurrent pytest runs on one machine (and if
    # this module is imported twice under two names); short enough that the root link name
    # "<lab>-root" stays readable
    return f"t{os.getpid() & 0xFFFF:x}{next(_counter)}{os.urandom(1).hex()}"


LabFactory = Callable[..., "object"]


def _factory() -> tuple[LabFactory, list]:
    from scanner.lab.netns import Lab

    made: list[Lab] = []

    def make(hosts: int = 2, names: list[str] | None = None, host_link: bool = True) -> Lab:
        name = unique_lab_name()
        try:
            lab = Lab.up(hosts, name, names=names, host_link=host_link)
        except BaseException:
            Lab.cleanup(name)
            raise
        made.append(lab)
        return lab

    return make, made


def _teardown(made: list) -> None:
    for lab in reversed(made):
        lab.down()


@pytest.fixture
def make_lab() -> Iterator[LabFactory]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    make, made = _factory()
    try:
        yield make
    finally:
        _teardown(made)


@pytest.fixture(scope="module")
def module_lab() -> Iterator[LabFactory]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    make, made = _factory()
    try:
        yield make
    finally:
        _teardown(made)


@pytest.fixture
def lab(make_lab: LabFactory):
    return make_lab(hosts=2)


@pytest.fixture
def lab_name() -> Iterator[str]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    from scanner.lab.netns import Lab

    name = unique_lab_name()
    try:
        yield name
    finally:
        Lab.cleanup(name)
