"""Session fixtures: the tiny models, and the running processes that test modules with the same
environment share (each started on first use and stopped when the session ends)."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from broker.broker import Broker  # noqa: E402
from broker.driver import Driver  # noqa: E402
from common.config import Config  # noqa: E402
from tests.helpers import (  # noqa: E402
    COMPILED_DIT_HIGH,
    INT8_DITS,
    KEYED_ORIGINS,
    WEBHOOK_SECRET,
    ForeignPage,
    StageStack,
    System,
    running_stack,
    running_system,
    short_tmpdir,
    tiny_rife_state,
    tiny_srvgg_state,
    tiny_taehv_state,
)

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


@pytest.fixture(scope="session")
def int8_stack(model_cache: Path) -> Iterator[StageStack]:
    """The stage processes with int8 compute on both DiTs and dit_high compiled (aot_eager, t2v-A14B
    only), recording their wire traffic: one start for test_compute and test_compile."""
    with running_stack("wsq-", model_cache, WAN_SERVER__RUNTIME__RECORD_DIR='"{state}/record"', **INT8_DITS,
                       **COMPILED_DIT_HIGH) as s:
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


@pytest.fixture(scope="session")
def foreign_origins() -> Iterator[tuple[str, str]]:
    """(allowed origin, refused origin): two tiny web servers on other loopback ports, each serving
    a page of another web app (`ForeignPage`) that calls the gateway the way a browser does."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), ForeignPage) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield f"http://127.0.0.1:{servers[0].server_address[1]}", f"http://127.0.0.1:{servers[1].server_address[1]}"
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="session")
def keyed_system(model_cache: Path, foreign_origins: tuple[str, str]) -> Iterator[System]:
    """The whole system with API keys required, shared by the modules that need keys (test_auth,
    test_cors, test_studio, test_webhooks: each takes it through `keyed_view`, with users of its
    own): allowed origins for each of them, one job in the pipeline at a time (so the order jobs
    are dispatched in shows, and a job behind another waits queued), webhooks signed with
    WEBHOOK_SECRET with loopback allowed and a short backoff; tiny RIFE and SRVGG x2 upscale weights
    for the muxer and a tiny TAEHV preview decoder for t2v-A14B (test_rife, test_upscale, test_taehv:
    their paths through the system)."""
    def admin(s: System) -> None:
        s.tokens["admin"] = s.create_key("admin", "--admin")
        s.key_tokens.append(s.tokens["admin"])
        s.headers = {"Authorization": f"Bearer {s.tokens['admin']}"}
        torch.save({"module." + k: v for k, v in tiny_rife_state().items()}, s.state_dir / "flownet.pkl")
        torch.save(tiny_taehv_state(16, 1, seed=3), s.state_dir / "taew2_1.pth")
        torch.save({"params": tiny_srvgg_state()}, s.state_dir / "realesr-tiny-x2.pth")

    with running_system(
        "wsk-", model_cache, setup=admin,
        WAN_SERVER__GATEWAY__AUTH='"required"',
        WAN_SERVER__GATEWAY__ALLOWED_ORIGINS=json.dumps([*KEYED_ORIGINS, foreign_origins[0]]),
        WAN_SERVER__ADMISSION__MAX_INFLIGHT_PER_ROUTE="1",
        WAN_SERVER__WEBHOOKS__SECRET=WEBHOOK_SECRET,
        WAN_SERVER__WEBHOOKS__ALLOWED_HOSTS='["127.0.0.1"]',
        WAN_SERVER__WEBHOOKS__TIMEOUT_S="5",
        WAN_SERVER__WEBHOOKS__BACKOFF_INITIAL_S="0.3",
        WAN_SERVER__WEBHOOKS__BACKOFF_MAX_S="1",
        WAN_SERVER__WEBHOOKS__RETRY_WINDOW_S="120",
        WAN_SERVER__STAGES__MUXER__RIFE_WEIGHTS="{state}/flownet.pkl",
        WAN_SERVER__STAGES__MUXER__UPSCALE_WEIGHTS="{state}/realesr-tiny-x2.pth",
        WAN_SERVER__MODELS__T2V_A14B__PREVIEW_DECODER="{state}/taew2_1.pth",
    ) as s:
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
