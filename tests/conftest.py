from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker.driver import Driver  # noqa: E402
from tests.stack import StageStack, short_tmpdir  # noqa: E402

# Stage processes run with one torch thread (the tiny profile's setting); in-process references
# must use the same, or reductions may differ in the last bit.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Tiny models for the whole session; the first stage process to start builds them."""
    path = short_tmpdir("wsm-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(model_cache):
    """The five stage processes of the tiny profile, recording their wire traffic."""
    state = short_tmpdir("wss-")
    s = StageStack(
        state,
        model_cache,
        WAN_SERVER__RUNTIME__RECORD_DIR=str(state / "record"),
        # Small limits, so the tests can send oversize messages cheaply; tiny jobs fit easily.
        WAN_SERVER__LIMITS__MAX_MESSAGE_BYTES=str(8 << 20),
        WAN_SERVER__LIMITS__MAX_HEADER_BYTES=str(64 << 10),
        WAN_SERVER__LIMITS__MAX_FRAMES="64",
    ).start_all()
    try:
        with Driver(s.config) as driver:
            driver.wait_ready(timeout_s=180)
            s.driver = driver
            yield s
    finally:
        s.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def driver(stack) -> Driver:
    return stack.driver
