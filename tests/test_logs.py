from __future__ import annotations

import io
import logging
import re

from common.errors import ModelLoadError
from common.logs import job_context, setup_logging


def emit_lines():
    logging.getLogger("x").info("loaded %s", "vae")
    with job_context("abc123"):
        logging.getLogger("x").warning("step %d", 3)


def test_log_format_and_job_id():
    buf = io.StringIO()
    setup_logging("INFO", stream=buf)
    try:
        emit_lines()
    finally:
        setup_logging("WARNING")
    lines = buf.getvalue().splitlines()
    pattern = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[(INFO|WARNING)\] \[test_logs\.emit_lines\] "
    assert re.match(pattern + r"loaded vae$", lines[0])
    assert re.match(pattern + r"job=abc123 step 3$", lines[1])


def test_structured_error_body():
    err = ModelLoadError("vae missing", {"path": "/m/vae"})
    assert err.to_dict() == {
        "success": False,
        "error": {"code": "MODEL_LOAD_ERROR", "message": "vae missing", "details": {"path": "/m/vae"}},
    }
    back = ModelLoadError.from_dict(err.to_dict())
    assert back.code == "MODEL_LOAD_ERROR" and back.details == {"path": "/m/vae"}
