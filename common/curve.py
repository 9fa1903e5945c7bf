"""CURVE keys for a deployment whose processes talk over TCP between hosts.

One keys folder, copied to every host of the deployment:

    server.key, server.key_secret        the keypair every binding socket serves with
    client.key, client.key_secret        the keypair every connecting socket presents
    authorized_clients/*.key             client public keys a binding socket accepts

A binding socket is a CURVE server and runs a ZAP authenticator that accepts only the public keys
in `authorized_clients/`; a peer with no keys, or with keys not listed there, never completes the
handshake, so none of its messages reach the socket. Set `[network] curve_keys_dir` in the profile;
every tcp:// socket then uses CURVE, and a non-loopback endpoint without it is refused at startup.

    python -m common.curve init DIR              # a new keys folder (server + one authorized client)
    python -m common.curve add-client DIR NAME   # another client keypair, authorized

Binding processes read `authorized_clients/` when they start: restart them after adding a client.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from common.errors import ConfigError


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes | None
    client_public: bytes
    client_secret: bytes
    authorized_dir: Path

    @classmethod
    def load(cls, keys_dir: Path) -> CurveKeys:
        if not zmq.has("curve"):
            raise ConfigError("this libzmq has no CURVE support; a cross-host deployment needs it", {})

        def read(name: str) -> tuple[bytes, bytes | None]:
            path = keys_dir / name
            if not path.is_file():
                raise ConfigError(
                    f"CURVE key file {path} is missing",
                    {"file": str(path), "expected": "a certificate written by `python -m common.curve init`"},
                )
            try:
                return zmq.auth.load_certificate(path)
            except (ValueError, OSError) as exc:
                raise ConfigError(f"CURVE key file {path} is not a valid certificate", {"file": str(path)}) from exc

        server_public, _ = read("server.key")
        server_secret = None
        if (keys_dir / "server.key_secret").exists():
            _, server_secret = read("server.key_secret")
        client_public, client_secret = read("client.key_secret")
        if client_secret is None:
            raise ConfigError("client.key_secret holds no secret key", {"file": "client.key_secret"})
        authorized = keys_dir / "authorized_clients"
        if not authorized.is_dir():
            raise ConfigError(
                f"CURVE keys folder {keys_dir} has no authorized_clients/ folder", {"file": str(authorized)}
            )
        return cls(server_public, server_secret, client_public, client_secret, authorized)


def init_keys(keys_dir: Path) -> None:
    keys_dir.mkdir(parents=True, exist_ok=True)
    keys_dir.chmod(0o700)
    zmq.auth.create_certificates(keys_dir, "server")
    add_client(keys_dir, "client")


def add_client(keys_dir: Path, name: str) -> Path:
    authorized = keys_dir / "authorized_clients"
    authorized.mkdir(exist_ok=True)
    public, _secret = zmq.auth.create_certificates(keys_dir, name)
    target = authorized / f"{name}.key"
    target.write_bytes(Path(public).read_bytes())
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="make CURVE keys for a cross-host deployment")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="a new keys folder: server keypair and one authorized client keypair")
    p_init.add_argument("dir", type=Path)
    p_add = sub.add_parser("add-client", help="another client keypair, authorized")
    p_add.add_argument("dir", type=Path)
    p_add.add_argument("name")
    args = parser.parse_args(argv)
    if args.cmd == "init":
        if (args.dir / "server.key_secret").exists():
            sys.exit(f"{args.dir} already holds keys; refusing to overwrite them")
        init_keys(args.dir)
        print(args.dir)
    else:
        print(add_client(args.dir, args.name))


if __name__ == "__main__":
    main()
