"""Configuration: one TOML file (a deployment profile) plus environment overrides.

The file is chosen by `--config PATH`, else `$WAN_SERVER_CONFIG`, else the `tiny` profile shipped in
`common/profiles/`. Any key can be overridden from the environment as
`WAN_SERVER__<SECTION>__<KEY>[__<KEY>...]=value` (the value is parsed as a TOML value when it
parses, else taken as a string), e.g. `WAN_SERVER__RUNTIME__STATE_DIR=/tmp/wan`.

Relative paths in the file are taken from the project root, so every process agrees on them
whatever its working directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError

if TYPE_CHECKING:
    from common.wire import Limits

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
ENV_PREFIX = "WAN_SERVER__"
ENV_CONFIG = "WAN_SERVER_CONFIG"

STAGE_KINDS = ("text_encoder", "dit", "vae", "muxer")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Weights stored in these and cast layer by layer to the compute dtype (diffusers' layerwise casting).
STORAGE_DTYPES = ("float8_e4m3fn", "float8_e5m2")
ATTENTION_BACKENDS = ("auto", "sdpa", "flash")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
MAX_IPC_PATH = 100  # sockaddr_un allows 107 bytes; keep a margin


def profile_path(name: str) -> Path:
    return PROFILES_DIR / f"{name}.toml"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            # Section names may contain '-' (model names); env vars spell them with '_'.
            match = next((k for k in node if k.lower().replace("-", "_") == part), part)
            node = node.setdefault(match, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key} overrides a value that is not a section", {"env": key})
        leaf = next((k for k in node if k.lower().replace("-", "_") == path[-1]), path[-1])
        node[leaf] = _parse_env_value(raw)


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    device: str
    dtype: str
    options: dict[str, Any]

    @property
    def storage_dtype(self) -> str | None:
        """The dtype weights are stored in, when it differs from the compute `dtype` (fp8)."""
        return self.options.get("storage_dtype")

    @property
    def attention(self) -> str:
        return str(self.options.get("attention", "auto"))


class Config:
    """A loaded profile. Read-only after load; every process builds its own from the same file."""

    def __init__(self, data: dict[str, Any], source: Path | None = None):
        self.data = data
        self.source = source
        self._validate()

    # ---- loading ----
    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Config:
        environ = dict(os.environ if environ is None else environ)
        chosen = Path(path) if path else Path(environ[ENV_CONFIG]) if environ.get(ENV_CONFIG) else profile_path("tiny")
        if not chosen.is_absolute():
            chosen = (Path.cwd() / chosen).resolve()
        try:
            data = tomllib.loads(chosen.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {chosen} does not exist", {"path": str(chosen)}) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {chosen} is not valid TOML: {exc}", {"path": str(chosen)}) from None
        _apply_env(data, environ)
        return cls(data, chosen)

    def _validate(self) -> None:
        for name, spec in self.data.get("stages", {}).items():
            kind = spec.get("kind", name)
            if kind not in STAGE_KINDS:
                raise ConfigError(f"stage {name!r} has unknown kind {kind!r}", {"stage": name, "kinds": STAGE_KINDS})
            self._validate_stage(name, spec)
        served = self.data.get("serving", {}).get("models")
        if served is not None:
            unknown = [name for name in served if name not in self.data.get("models", {})]
            if not isinstance(served, list) or unknown:
                raise ConfigError(f"[serving] models names undefined model(s) {unknown}", {"models": unknown})
        for model, route in self.data.get("routes", {}).items():
            for stage in route:
                if stage not in self.data.get("stages", {}):
                    raise ConfigError(f"route of {model!r} names unknown stage {stage!r}", {"model": model})

    @staticmethod
    def _validate_stage(name: str, spec: dict[str, Any]) -> None:
        def bad(key: str, allowed: Any) -> ConfigError:
            return ConfigError(
                f"stage {name!r}: {key} = {spec.get(key)!r} is not one of {allowed}",
                {"stage": name, "key": key, "value": repr(spec.get(key)), "allowed": list(allowed)},
            )

        if not DEVICE_PATTERN.match(str(spec.get("device", "cpu"))):
            raise bad("device", ["cpu", "cuda", "cuda:N"])
        if str(spec.get("dtype", "float32")) not in COMPUTE_DTYPES:
            raise bad("dtype", COMPUTE_DTYPES)
        if "storage_dtype" in spec and spec["storage_dtype"] not in STORAGE_DTYPES:
            raise bad("storage_dtype", STORAGE_DTYPES)
        if str(spec.get("attention", "auto")) not in ATTENTION_BACKENDS:
            raise bad("attention", ATTENTION_BACKENDS)
        if not isinstance(spec.get("vae_tiling", False), bool):
            raise bad("vae_tiling", [True, False])

    # ---- sections ----
    def section(self, name: str) -> dict[str, Any]:
        return dict(self.data.get(name, {}))

    def path(self, value: str | os.PathLike[str]) -> Path:
        p = Path(os.path.expanduser(str(value)))
        return p if p.is_absolute() else PROJECT_ROOT / p

    @property
    def state_dir(self) -> Path:
        return self.path(self.section("runtime").get("state_dir", "var"))

    @property
    def results_dir(self) -> Path:
        return self.path(self.section("runtime").get("results_dir", self.state_dir / "results"))

    @property
    def spool_dir(self) -> Path:
        """Per-job working files (`<spool_dir>/<job_id>/`): uploaded inputs, DiT hand-off checkpoints.
        The broker removes a job's folder once the job is final."""
        return self.path(self.section("runtime").get("spool_dir", self.state_dir / "spool"))

    def job_spool(self, job_id: str) -> Path:
        return self.spool_dir / job_id

    @property
    def socket_dir(self) -> Path:
        return self.path(self.section("runtime").get("socket_dir", self.state_dir / "sock"))

    @property
    def model_cache_dir(self) -> Path:
        return self.path(self.section("runtime").get("model_cache_dir", self.state_dir / "models"))

    @property
    def limits(self) -> Limits:
        from common.wire import Limits  # here, not at the top: wire imports torch, and the keys CLI needs none

        return Limits.from_config(self.section("limits"))

    @property
    def torch_threads(self) -> int:
        return int(self.section("runtime").get("torch_threads", 0))

    @property
    def log_level(self) -> str:
        return str(self.section("runtime").get("log_level", "INFO"))

    @property
    def heartbeat_interval(self) -> float:
        return float(self.section("runtime").get("heartbeat_interval_s", 1.0))

    def stage(self, name: str) -> StageSpec:
        stages = self.data.get("stages", {})
        if name not in stages:
            raise ConfigError(f"no stage named {name!r} in the config", {"stage": name, "stages": sorted(stages)})
        spec = dict(stages[name])
        return StageSpec(
            name=name,
            kind=spec.pop("kind", name),
            device=spec.pop("device", "cpu"),
            dtype=spec.pop("dtype", "float32"),
            options=spec,
        )

    def stage_names(self) -> list[str]:
        return list(self.data.get("stages", {}))

    def model(self, name: str) -> dict[str, Any]:
        models = self.data.get("models", {})
        if name not in models:
            raise ConfigError(f"model {name!r} is not served by this profile", {"model": name, "models": sorted(models)})
        return dict(models[name])

    def model_names(self) -> list[str]:
        """The models this server serves: `[serving] models` when set, else every `[models.*]` entry.

        A profile can describe more models than it loads (their paths, resolutions, presets), and
        pick what fits its cards in `[serving]`; the stages load only the served ones."""
        defined = self.defined_model_names()
        served = self.data.get("serving", {}).get("models")
        return defined if served is None else [name for name in served if name in defined]

    def defined_model_names(self) -> list[str]:
        return list(self.data.get("models", {}))

    def route(self, model: str) -> list[str]:
        routes = self.data.get("routes", {})
        route = routes.get(model, routes.get("default"))
        if not route:
            raise ConfigError(f"no route for model {model!r}", {"model": model})
        return list(route)

    def curve_keys(self):
        """The deployment's CURVE keys (`[network] curve_keys_dir`), or None when not configured."""
        keys_dir = self.section("network").get("curve_keys_dir")
        if not keys_dir:
            return None
        from common.curve import CurveKeys

        return CurveKeys.load(self.path(keys_dir))

    def endpoint(self, name: str) -> str:
        """The address the named peer binds: a stage name, or `reports`."""
        configured = self.section("endpoints").get(name)
        if configured:
            return str(configured)
        path = self.socket_dir / f"{name}.sock"
        if len(str(path)) > MAX_IPC_PATH:
            raise ConfigError(
                f"ipc socket path {path} is longer than {MAX_IPC_PATH} bytes; set runtime.socket_dir to a shorter folder",
                {"path": str(path)},
            )
        return f"ipc://{path}"
