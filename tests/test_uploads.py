"""Image-to-video through the API: uploads (multipart and base64), their validation, the spool folder."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import zlib

import av
import pytest
from PIL import Image

from gateway.client import Client
from tests.error_bodies import check_error_body
from tests.helpers import System, multipart, post_multipart

MAX_UPLOAD = 2 << 20  # the tiny profile's [gateway] max_upload_bytes


@pytest.fixture(scope="module")
def system(api_system: System) -> System:
    return api_system


def picture(w: int, h: int, fmt: str, **save) -> bytes:
    img = Image.merge("RGB", [Image.linear_gradient("L").resize((w, h)), Image.effect_noise((w, h), 40),
                              Image.radial_gradient("L").resize((w, h))])
    out = io.BytesIO()
    img.save(out, fmt, **save)
    return out.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels, with ~100 bytes of data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


I2V = json.dumps({"prompt": "a cat turns its head", "model": "i2v", "quality_preset": "draft"}).encode()


def raw_post(system, body: bytes, ctype: str, chunked: bool) -> tuple[int, dict]:
    """POST over a plain socket, reading the answer as soon as it comes (the server may refuse an
    oversize body before reading it all)."""
    head = f"POST /api/v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nConnection: close\r\n".encode()
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", system.port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for i in range(0, len(body), 64 << 10):
                part = body[i:i + (64 << 10)]
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1])


def video(system, job_id: str) -> list:
    status, _, data = system.request("GET", f"/api/v1/files/{job_id}.mp4")
    assert status == 200
    with av.open(io.BytesIO(data), "r") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def test_image_jobs_multipart_png_via_cli_and_base64_jpeg(system, tmp_path):
    png = tmp_path / "photo.png"
    png.write_bytes(picture(80, 50, "PNG"))
    out = tmp_path / "i2v.mp4"
    cmd = [sys.executable, "-m", "gateway.client", "--url", system.url, "generate", "--prompt", "a cat turns its head",
           "--model", "i2v", "--quality", "draft", "--seed", "5", "--image", str(png), "--wait", "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[0])["job_id"]

    jpeg = picture(30, 60, "JPEG", quality=90)
    status, body = system.json("POST", "/api/v1/generate", {
        "prompt": "a robot waves", "model": "ti2v", "quality_preset": "standard", "seed": 6,
        "image": base64.b64encode(jpeg).decode()})
    assert status == 202, body
    second = body["job_id"]
    assert system.wait_final(second, timeout_s=180)["status"] == "completed"

    presets = system.json("GET", "/api/v1/presets")[1]["presets"]
    # ti2v standard is 64x32 (WxH): a portrait image turns it to 32x64; i2v draft is square.
    assert presets["ti2v-5B"]["standard"]["resolution"] == "64x32"
    for job_id, model, preset, (width, height) in ((first, "i2v-A14B", "draft", (32, 32)),
                                                   (second, "ti2v-5B", "standard", (32, 64))):
        frames = video(system, job_id)
        assert len(frames) == presets[model][preset]["num_frames"] and frames[0].shape == (height, width, 3)
        meta = system.json("GET", f"/api/v1/result/{job_id}")[1]["metadata"]
        assert meta["model"] == model and len(meta["params"]["image_sha256"]) == 64
        # The job's spool folder (where the broker kept the image) is gone once the job is final.
        assert not (system.state_dir / "spool" / job_id).exists()
    assert out.read_bytes() == system.request("GET", f"/api/v1/files/{first}.mp4")[2]

    # The same image through the Python client's multipart upload and as a data: URL give the same
    # stored image as the CLI did (the gateway re-encodes every upload the same way).
    again = Client(system.url).generate("a cat turns its head", "i2v", "draft", image=png, seed=5)
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    status, third = system.json("POST", "/api/v1/generate", {"prompt": "a cat", "model": "i2v", "image": url})
    assert status == 202, third
    jobs = [again["job_id"], third["job_id"]]
    if shutil.which("curl"):  # the README's curl example, as written there
        request = '{"prompt": "the cat turns its head", "model": "i2v", "quality_preset": "draft"}'
        curl = subprocess.run(["curl", "-s", "-X", "POST", f"{system.url}/api/v1/generate",
                               "-F", f"request={request};type=application/json", "-F", f"image=@{png}"],
                              capture_output=True, text=True, timeout=60)
        jobs.append(json.loads(curl.stdout)["job_id"])
    for job_id in jobs:
        assert system.wait_final(job_id, timeout_s=180)["status"] == "completed"
    shas = {system.json("GET", f"/api/v1/result/{j}")[1]["metadata"]["params"]["image_sha256"]
            for j in (first, *jobs)}
    assert len(shas) == 1


GOOD_PNG = picture(40, 40, "PNG")
BAD_UPLOADS = [
    # name, how to send, expected status, expected code
    ("GIF", ("multipart", [("request", None, "application/json", I2V),
                           ("image", "a.gif", "image/gif", picture(20, 20, "GIF"))]), 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("text named .png", ("multipart", [("request", None, None, I2V),
                                       ("image", "a.png", "image/png", b"hello, not a picture")]),
     415, "UNSUPPORTED_MEDIA_TYPE"),
    ("PNG sent as JPEG", ("multipart", [("request", None, None, I2V), ("image", "a.jpg", "image/jpeg", GOOD_PNG)]),
     415, "UNSUPPORTED_MEDIA_TYPE"),
    ("50000x50000 PNG header", ("multipart", [("request", None, None, I2V),
                                              ("image", "bomb.png", "image/png", png_claiming(50_000, 50_000))]),
     413, "IMAGE_TOO_LARGE"),
    ("5000x5000 PNG header", ("json", {"image": base64.b64encode(png_claiming(5000, 5000)).decode()}),
     413, "IMAGE_TOO_LARGE"),
    ("truncated PNG", ("multipart", [("request", None, None, I2V), ("image", "t.png", "image/png", GOOD_PNG[:-40])]),
     422, "INVALID_IMAGE"),
    ("truncated JPEG", ("json", {"image": base64.b64encode(picture(64, 64, "JPEG")[:600]).decode()}),
     422, "INVALID_IMAGE"),
    ("bad base64", ("json", {"image": "iVBORw0KGgo*&^%"}), 422, "INVALID_IMAGE"),
    ("image not a string", ("json", {"image": 12}), 422, "INVALID_IMAGE"),
    ("empty file", ("multipart", [("request", None, None, I2V), ("image", "e.png", "image/png", b"")]),
     422, "INVALID_IMAGE"),
    ("three parts", ("multipart", [("request", None, None, I2V), ("image", "a.png", "image/png", GOOD_PNG),
                                   ("image", "b.png", "image/png", GOOD_PNG)]), 400, "INVALID_MULTIPART"),
    ("extra field", ("multipart", [("request", None, None, I2V), ("extra", None, None, b"x"),
                                   ("image", "a.png", "image/png", GOOD_PNG)]), 400, "INVALID_MULTIPART"),
    ("no request part", ("multipart", [("image", "a.png", "image/png", GOOD_PNG)]), 400, "INVALID_MULTIPART"),
    ("image as a plain field", ("multipart", [("request", None, None, I2V), ("image", None, None, b"abc")]),
     400, "INVALID_MULTIPART"),
    ("request part not JSON", ("multipart", [("request", None, None, b"{nope"), ("image", "a.png", None, GOOD_PNG)]),
     400, "INVALID_JSON"),
    ("i2v without an image", ("json", {"drop_image": True}), 422, "VALIDATION_ERROR"),
    ("t2v given an image", ("json", {"model": "t2v", "image": base64.b64encode(GOOD_PNG).decode()}),
     422, "VALIDATION_ERROR"),
    ("raw image body", ("raw", ("image/png", GOOD_PNG)), 415, "UNSUPPORTED_MEDIA_TYPE"),
]


@pytest.mark.parametrize("name,send,status,code", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_refused_with_structured_errors(system, name, send, status, code):
    how, what = send
    if how == "multipart":
        got, _, content = post_multipart(system, what)
    elif how == "raw":
        got, _, content = system.request("POST", "/api/v1/generate", raw=what[1], headers={"Content-Type": what[0]})
    else:
        body = {"prompt": "a cat", "model": "i2v", "quality_preset": "draft", **what}
        if body.pop("drop_image", False):
            body.pop("image", None)
        got, _, content = system.request("POST", "/api/v1/generate", body)
    body = json.loads(content)
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["success"] is False and set(body["error"]) == {"code", "message", "details"}
    assert "Traceback" not in content.decode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("kind", ["multipart", "base64"])
def test_oversize_upload_refused_before_it_is_read(system, kind, chunked):
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (6 * MAX_UPLOAD)
    if kind == "multipart":
        body, ctype = multipart([("request", None, None, I2V), ("image", "big.png", "image/png", big)])
    else:
        body = json.dumps({"prompt": "x", "model": "i2v", "image": base64.b64encode(big).decode()}).encode()
        ctype = "application/json"
    status, answer = raw_post(system, body, ctype, chunked)
    check_error_body("/api/v1/generate", status, answer, [str(system.state_dir)])
    assert status == 413 and answer["error"]["code"] == "PAYLOAD_TOO_LARGE", answer


def test_upload_just_over_the_limit_refused_and_a_good_job_still_completes(system, tmp_path):
    # Within the body bound but over max_upload_bytes as a file: refused with 413 after parsing.
    over = b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_UPLOAD
    status, _, content = post_multipart(system, [("request", None, None, I2V), ("image", "o.png", "image/png", over)])
    assert (status, json.loads(content)["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")
    # Nothing refused left a spool folder behind; the system serves on.
    spool = system.state_dir / "spool"
    png = tmp_path / "ok.webp"
    png.write_bytes(picture(48, 32, "WEBP"))
    job = Client(system.url).generate("after the refusals", "i2v", "draft", image=png)
    assert system.wait_final(job["job_id"], timeout_s=180)["status"] == "completed"
    left = sorted(str(p.relative_to(spool)) for p in spool.rglob("*")) if spool.exists() else []
    assert not left, left
