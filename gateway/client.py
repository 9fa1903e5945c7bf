"""Python client and command line for the server's HTTP/WebSocket API (standard library + websockets).

    python -m gateway.client generate --prompt "a cat walks" --model t2v --quality draft --wait -o cat.mp4
    python -m gateway.client generate --prompt "she turns and smiles" --model i2v --image photo.jpg --wait
    python -m gateway.client generate --prompt "a paper boat" --model t2v --video boat.mp4 --strength 0.7 --wait
    python -m gateway.client promote JOB_ID --quality pro [--strength 0.6] [--prompt "..."] --wait -o best.mp4
    python -m gateway.client status JOB_ID | result JOB_ID | cancel JOB_ID | list [--status completed]

With API keys on (`python -m gateway.keys create NAME`), pass the token as `--api-key` or in
$WAN_SERVER_API_KEY; it is sent as `Authorization: Bearer <token>`, on the WebSocket too.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from websockets.sync.client import connect

DEFAULT_URL = "http://127.0.0.1:8001"
ENV_API_KEY = "WAN_SERVER_API_KEY"


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"{status} {error.get('code', 'ERROR')}: {error.get('message', body)}")
        self.status = status
        self.code = error.get("code")
        self.body = body


class Client:
    def __init__(self, base_url: str = DEFAULT_URL, timeout_s: float = 30.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _request(self, method: str, path: str, body: Any = None, image: Path | None = None,
                 files: dict[str, Path] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {**self.headers, **({"Content-Type": "application/json"} if data else {})}
        files = {**({"image": Path(image)} if image is not None else {}), **(files or {})}
        if files:
            data, headers["Content-Type"] = multipart_body(data or b"{}", files=files)
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                answer: dict[str, Any] = json.loads(resp.read())  # the API answers with a JSON object
                return answer
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read())
            except ValueError:
                payload = {}
            raise ApiError(exc.code, payload) from None

    def generate(self, prompt: str, model: str = "t2v-A14B", quality_preset: str = "standard",
                 image: Path | str | None = None, audio: Path | str | None = None,
                 pose_video: Path | str | None = None, video: Path | str | None = None,
                 **extra: Any) -> dict[str, Any]:
        """Submit a job; with `image` (a PNG, JPEG or WebP file), for s2v `audio` (WAV, FLAC, MP3,
        OGG, M4A) and `pose_video` (MP4, WebM), and for video-to-video `video` (MP4, WebM, MKV; with
        `strength` in `extra`), the files are uploaded as multipart/form-data."""
        given = {"image": image, "audio": audio, "pose_video": pose_video, "video": video}
        return self._request("POST", "/api/v1/generate",
                             {"prompt": prompt, "model": model, "quality_preset": quality_preset, **extra},
                             files={k: Path(v) for k, v in given.items() if v is not None})

    def promote(self, job_id: str, quality_preset: str, **extra: Any) -> dict[str, Any]:
        """Re-render a completed job of yours at a higher preset from its own frames (`strength`,
        `prompt`, `negative_prompt`, `custom_options`... in `extra`): a new job, as generate answers."""
        return self._request("POST", f"/api/v1/promote/{job_id}", {"quality_preset": quality_preset, **extra})

    def status(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/status/{job_id}")

    def result(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/v1/result/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/api/v1/cancel/{job_id}")

    def jobs(self, status: str | None = None, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        query = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return self._request("GET", f"/api/v1/jobs?{urlencode(query)}")

    def download(self, job_id: str, dest: Path) -> Path:
        result = self.result(job_id)
        if not result.get("output_url"):
            raise ApiError(409, {"error": {"code": "NO_VIDEO", "message": f"job is {result.get('status')}"}})
        req = urllib.request.Request(self.base_url + result["output_url"], headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            tmp = dest.with_name(dest.name + ".part")
            with open(tmp, "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
            tmp.replace(dest)
        return dest

    def events(self, job_id: str | None = None, timeout_s: float = 600.0) -> Iterator[dict[str, Any]]:
        """WebSocket events for one job (or all jobs): a snapshot first, then status/progress/complete/error."""
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        with connect(f"{scheme}://{parts.netloc}/ws", open_timeout=self.timeout_s,
                     additional_headers=self.headers) as ws:
            ws.send(json.dumps({"action": "subscribe", **({"job_id": job_id} if job_id else {"all": True})}))
            while True:
                yield json.loads(ws.recv(timeout=timeout_s))

    def wait(
        self, job_id: str, on_event: Callable[[dict[str, Any]], None] | None = None, timeout_s: float = 600.0
    ) -> dict[str, Any]:
        """Follow a job over the WebSocket until it ends; returns its final status."""
        for event in self.events(job_id, timeout_s):
            if on_event:
                on_event(event)
            status = event.get("status")
            if event["event"] in ("complete", "error") or status in ("completed", "failed", "cancelled"):
                return self.status(job_id)
        raise TimeoutError(job_id)


def multipart_body(request_json: bytes, image: Path | None = None,
                   files: dict[str, Path] | None = None) -> tuple[bytes, str]:
    """The API's multipart form: a `request` part (the JSON request) and a file part per input
    (`image`; for s2v also `audio`, `pose_video`)."""
    boundary = uuid.uuid4().hex
    files = {**({"image": image} if image is not None else {}), **(files or {})}
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n".encode(),
             b"Content-Type: application/json\r\n\r\n", request_json, b"\r\n"]
    for field, path in files.items():
        # An image's type from its name; audio and video names map to many types: their bytes decide.
        guessed = mimetypes.guess_type(path.name)[0] if field == "image" else None
        ctype = guessed or "application/octet-stream"
        name = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts += [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n".encode(),
                  f"Content-Type: {ctype}\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
    body = b"".join([*parts, f"--{boundary}--\r\n".encode()])
    return body, f"multipart/form-data; boundary={boundary}"


def _bar(event: dict[str, Any]) -> None:
    if "progress" in event:
        width = 30
        filled = int(width * float(event["progress"]))
        eta = event.get("eta")
        eta_text = f" eta {eta:.0f}s" if isinstance(eta, (int, float)) else ""
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * float(event['progress']):5.1f}%{eta_text}   ",
              end="", file=sys.stderr, flush=True)


def _submitted(client: Client, job: dict[str, Any], wait: bool, output: Path | None) -> int:
    """Print the new job; with `wait`, follow it and download its MP4 (exit 1 if it did not complete)."""
    print(json.dumps(job))
    if wait:
        final = client.wait(job["job_id"], on_event=_bar)
        print(file=sys.stderr)
        if final["status"] != "completed":
            print(json.dumps(final), file=sys.stderr)
            return 1
        print(client.download(job["job_id"], output or Path(f"{job['job_id']}.mp4")))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="wan-server client")
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--api-key", default=os.environ.get(ENV_API_KEY),
                        help=f"API key token (default: ${ENV_API_KEY}); needed when the server requires keys")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="submit a job")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--model", default="t2v-A14B")
    gen.add_argument("--quality", default="standard")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg-scale", type=float)
    gen.add_argument("--resolution", help="WxH")
    gen.add_argument("--fps", type=int)
    gen.add_argument("--duration", type=float)
    gen.add_argument("--image", type=Path,
                     help="input image (PNG, JPEG, WebP): required by i2v and s2v, optional for ti2v")
    gen.add_argument("--audio", type=Path, help="speech (WAV, FLAC, MP3, OGG, M4A): required by s2v")
    gen.add_argument("--pose-video", type=Path, help="pose video (MP4, WebM): optional for s2v")
    gen.add_argument("--video", type=Path, help="input video (MP4, WebM, MKV): video-to-video, for t2v and ti2v")
    gen.add_argument("--strength", type=float, help="how far the input video is noised (0 < s <= 1)")
    pro = sub.add_parser("promote", help="re-render a completed job at a higher preset from its frames")
    pro.add_argument("job_id")
    pro.add_argument("--quality", required=True, help="a preset above the job's")
    pro.add_argument("--strength", type=float)
    pro.add_argument("--prompt")
    pro.add_argument("--negative-prompt")
    for p in (gen, pro):
        p.add_argument("--wait", action="store_true", help="follow progress and download the video")
        p.add_argument("-o", "--output", type=Path, help="where --wait writes the MP4")
    for name in ("status", "result", "cancel"):
        sub.add_parser(name).add_argument("job_id")
    lst = sub.add_parser("list")
    lst.add_argument("--status")
    lst.add_argument("--limit", type=int, default=20)
    lst.add_argument("--offset", type=int, default=0)
    args = parser.parse_args(argv)
    client = Client(args.url, api_key=args.api_key)
    try:
        if args.command == "generate":
            given = {"steps": args.steps, "cfg_scale": args.cfg_scale, "resolution": args.resolution,
                     "fps": args.fps, "duration": args.duration}
            options = {k: v for k, v in given.items() if v is not None}
            extra = {
                k: v for k, v in {"negative_prompt": args.negative_prompt, "seed": args.seed}.items() if v is not None
            }
            if options:
                extra["custom_options"] = options
            if args.strength is not None:
                extra["strength"] = args.strength
            job = client.generate(args.prompt, args.model, args.quality, image=args.image, audio=args.audio,
                                  pose_video=args.pose_video, video=args.video, **extra)
            return _submitted(client, job, args.wait, args.output)
        if args.command == "promote":
            given = {"strength": args.strength, "prompt": args.prompt, "negative_prompt": args.negative_prompt}
            job = client.promote(args.job_id, args.quality, **{k: v for k, v in given.items() if v is not None})
            return _submitted(client, job, args.wait, args.output)
        if args.command == "list":
            print(json.dumps(client.jobs(args.status, args.limit, args.offset), indent=1))
        else:
            print(json.dumps(getattr(client, args.command)(args.job_id), indent=1))
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # connection refused, reset, timed out
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
