"""API keys: bearer tokens the gateway checks, stored only as salted HMAC-SHA256 digests.

A token reads `wan_<key id>_<secret>`: the key id (8 hex digits) finds the row, the secret (32
random bytes, urlsafe base64) is checked against `HMAC-SHA256(salt, secret)` in constant time.
The token is printed once, by `create`; nothing stores or logs it. The key id is what the server
records as a job's owner and writes in logs.

Keys live in `<state_dir>/keys.sqlite3`; the gateway reads them on every request, so a revoked
key stops working at once, without a restart.

A key may have its own webhook signing secret (`--webhook-secret`, Standard Webhooks' `whsec_` +
base64 of 32 random bytes, printed once): the broker signs the webhooks of that key's jobs with it
(`webhook_secret`, read at each attempt) instead of `[webhooks] secret`. Unlike the token it is kept
as it is, since signing needs it.

    python -m gateway.keys create alice [--admin] [--rate-per-minute 60] [--max-active-jobs 4] [--webhook-secret]
    python -m gateway.keys webhook-secret alice    # a new webhook secret for the key (by name or key id)
    python -m gateway.keys list
    python -m gateway.keys revoke alice        # by name or key id
"""

from __future__ import annotations

import argparse
import base64
import builtins
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import Config, load_or_exit

TOKEN = re.compile(r"^wan_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    rate_per_minute INTEGER,
    max_active_jobs INTEGER,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass(frozen=True)
class ApiKey:
    """A key as the server sees it: never the token."""

    id: str
    name: str
    admin: bool
    rate_per_minute: int | None
    max_active_jobs: int | None
    created_at: float
    revoked_at: float | None


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.new(salt, secret.encode(), hashlib.sha256).digest()


def keys_path(config: Config) -> Path:
    return config.state_dir / "keys.sqlite3"


class KeyStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(api_keys)")}
        if "webhook_secret" not in columns:  # a store written before per-key webhook secrets
            self.db.execute("ALTER TABLE api_keys ADD COLUMN webhook_secret TEXT")

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _key(row: sqlite3.Row) -> ApiKey:
        return ApiKey(id=row["id"], name=row["name"], admin=bool(row["admin"]),
                      rate_per_minute=row["rate_per_minute"], max_active_jobs=row["max_active_jobs"],
                      created_at=row["created_at"], revoked_at=row["revoked_at"])

    def create(self, name: str, admin: bool = False, rate_per_minute: int | None = None,
               max_active_jobs: int | None = None) -> tuple[ApiKey, str]:
        """A new key and its token (shown once; only its salted digest is kept)."""
        if not NAME.match(name):
            raise ValueError("a key name is 1-64 letters, digits, '.', '_', '@' or '-'")
        for value in (rate_per_minute, max_active_jobs):
            if value is not None and value < 1:
                raise ValueError("limits are positive integers")
        while True:
            key_id = secrets.token_hex(4)
            if self.db.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is None:
                break
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        self.db.execute(
            "INSERT INTO api_keys (id, name, salt, digest, admin, rate_per_minute, max_active_jobs, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, name, salt, _digest(salt, secret), int(admin), rate_per_minute, max_active_jobs, time.time()),
        )
        key = self.get(key_id)
        assert key is not None
        return key, f"wan_{key_id}_{secret}"

    def get(self, key_id: str) -> ApiKey | None:
        row = self.db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return self._key(row) if row else None

    def list(self) -> list[ApiKey]:
        return [self._key(r) for r in self.db.execute("SELECT * FROM api_keys ORDER BY created_at").fetchall()]

    # builtins.list: inside the class, `list` names the method above.
    def revoke(self, id_or_name: str) -> builtins.list[ApiKey]:
        """Revoke the key with this id, or every live key with this name; returns what was revoked."""
        rows = self.db.execute("SELECT id FROM api_keys WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                               (id_or_name, id_or_name)).fetchall()
        ids = [r["id"] for r in rows]
        for key_id in ids:
            self.db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
        return [k for k in (self.get(i) for i in ids) if k is not None]

    def new_webhook_secret(self, id_or_name: str) -> builtins.list[tuple[ApiKey, str]]:
        """A new webhook signing secret for the live key with this id (or every live key with this name)."""
        rows = self.db.execute("SELECT id FROM api_keys WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                               (id_or_name, id_or_name)).fetchall()
        out = []
        for row in rows:
            secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
            self.db.execute("UPDATE api_keys SET webhook_secret = ? WHERE id = ?", (secret, row["id"]))
            key = self.get(row["id"])
            assert key is not None
            out.append((key, secret))
        return out

    def verify(self, token: str) -> ApiKey | None:
        """The live key this token belongs to, or None. The secret is compared in constant time."""
        match = TOKEN.match(token)
        if not match:
            return None
        key_id, secret = match.groups()
        row = self.db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            _digest(b"\0" * 16, secret)  # the same work whether or not the id exists
            return None
        if not hmac.compare_digest(_digest(row["salt"], secret), row["digest"]) or row["revoked_at"] is not None:
            return None
        return self._key(row)


def webhook_secret(path: Path, key_id: str) -> str | None:
    """The key's own webhook signing secret, None if it has none (or there is no key store): read-only,
    for the broker's delivery thread."""
    if not key_id or not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        row = db.execute("SELECT webhook_secret FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    except sqlite3.OperationalError:  # a store written before per-key webhook secrets
        return None
    finally:
        db.close()
    return row[0] if row and isinstance(row[0], str) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="manage the gateway's API keys")
    parser.add_argument("--config", help="profile TOML (default: $WAN_SERVER_CONFIG or the tiny profile)")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print its token (shown only this once)")
    create.add_argument("name")
    create.add_argument("--admin", action="store_true", help="sees and manages every user's jobs")
    create.add_argument("--rate-per-minute", type=int,
                        help="requests per minute (default: [gateway] rate_limit_per_minute)")
    create.add_argument("--max-active-jobs", type=int,
                        help="queued + running jobs at once (default: [gateway] max_active_jobs_per_key)")
    create.add_argument("--webhook-secret", action="store_true",
                        help="give the key its own webhook signing secret (printed once) instead of the server's")
    create.add_argument("--json", action="store_true", help="print the key and token as JSON")
    sub.add_parser("list", help="list keys (never their tokens)")
    revoke = sub.add_parser("revoke", help="revoke a key by id, or every key with that name")
    revoke.add_argument("key")
    rotate = sub.add_parser("webhook-secret", help="a new webhook signing secret for a key (printed once)")
    rotate.add_argument("key")
    args = parser.parse_args(argv)
    store = KeyStore(keys_path(load_or_exit(args.config)))
    try:
        if args.command == "create":
            try:
                key, token = store.create(args.name, args.admin, args.rate_per_minute, args.max_active_jobs)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            shown: dict[str, str] = {"token": token}
            if args.webhook_secret:
                shown["webhook_secret"] = store.new_webhook_secret(key.id)[0][1]
            if args.json:
                print(json.dumps({**asdict(key), **shown}))
            else:
                print(f"key {key.id} ({key.name}{', admin' if key.admin else ''}) created; its token, shown only now:")
                print(token)
                if args.webhook_secret:
                    print(f"its webhook signing secret: {shown['webhook_secret']}")
        elif args.command == "webhook-secret":
            made = store.new_webhook_secret(args.key)
            if not made:
                print(f"error: no live key with id or name {args.key!r}", file=sys.stderr)
                return 1
            for key, secret in made:
                print(f"key {key.id} ({key.name}): new webhook signing secret, shown only now:")
                print(secret)
        elif args.command == "list":
            print(json.dumps([asdict(k) for k in store.list()], indent=1))
        else:
            revoked = store.revoke(args.key)
            if not revoked:
                print(f"error: no live key with id or name {args.key!r}", file=sys.stderr)
                return 1
            for key in revoked:
                print(f"revoked {key.id} ({key.name})")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
