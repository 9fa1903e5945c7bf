"""Session fixtures: the tiny models, and the running processes that test modules with the same
environment share (each started on first use and stopped when the session ends)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker.broker import Broker  # noqa: E402
from broker.driver import Driver  # noqa: E402
from common.config import Config  # noqa: E402
from tests.helpers import StageStack, System, running_stack, running_system, short_tmpdir  # noqa: E402

# Stage processes run with one torch thread (the tiny profile's setting); in-process references
# must use the same, or reductions may differ in the last bit.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_cache() -> Iterator[Path]:
    """Tiny models for the whole session; the first stage process to start builds them."""
    path = short_tmpdir("wsm-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(model_cache: Path) -> Iterator[StageStack]:
    """The five stage processes of the tiny profile, recording their wire traffic, with a Driver in
    place of the broker. Shared by every module that drives stages directly; none of them stops a
    stage or changes its settings."""
    with running_stack(
        "wss-",
        model_cache,
        WAN_SERVER__RUNTIME__RECORD_DIR="{state}/record",
        # Small limits, so the tests can send oversize messages cheaply; tiny jobs fit easily.
        WAN_SERVER__LIMITS__MAX_MESSAGE_BYTES=str(8 << 20),
        WAN_SERVER__LIMITS__MAX_HEADER_BYTES=str(64 << 10),
        WAN_SERVER__LIMITS__MAX_FRAMES="64",
    ) as s:
        yield s


@pytest.fixture
def driver(stack: StageStack) -> Driver:
    return stack.driver


@pytest.fixture(scope="session")
def default_system(model_cache: Path) -> Iterator[System]:
    """The whole system under supervisord with the tiny profile's settings (no auth, default
    limits), for every module that needs nothing else. Use it through `api_system`."""
    with running_system("wsa-", model_cache) as s:
        yield s


@pytest.fixture(scope="module")
def api_system(default_system: System) -> System:
    """`default_system`, handed to each module ready and with no job queued or running: a module
    before it may have killed processes (supervisord restarts them) or left jobs in the queue."""
    default_system.wait_ready()
    default_system.wait_idle()
    return default_system


@pytest.fixture
def broker() -> Iterator[Broker]:
    """A Broker in this process, on its own state folder (real store, real files, its sockets bound
    but no stage running): tests drive it through its handlers."""
    state = short_tmpdir("wsb-")
    b = Broker(Config.load(environ={"WAN_SERVER__RUNTIME__STATE_DIR": str(state)}))
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(state, ignore_errors=True)
