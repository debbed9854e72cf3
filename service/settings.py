"""Settings from an injected environment mapping (and an optional TOML file named by it).

`Settings.from_environ(os.environ)` is the only reader of the environment; tests pass a dict.
A missing or wrong setting raises ConfigError naming it; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from schemas.errors import ConfigError
from schemas.secret import redact_url
from service.auth.algorithms import DEFAULT_ALGORITHMS

__all__ = ["Settings"]

T = TypeVar("T")

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Never `none`, never HS*: a symmetric algorithm would let a public key act as a shared secret.


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    vault_addr: str
    # Every node SECRETS_VAULT_ADDR lists (an HA cluster), `vault_addr` the first; () when the
    # struct was built without them: `vault_addr` alone.
    vault_addrs: tuple[str, ...] = ()
    oidc_issuer: str
    oidc_audience: str
    policy_file: str
    vault_token: str | None = None
    vault_role_id: str | None = None
    vault_secret_id: str | None = None
    # How the service logs in to Vault (service/vault/identity.py): token | approle | jwt; the
    # JWT login's role and token file, and the auth mount (None: the method's own name).
    vault_auth: str = "token"
    vault_role: str | None = None
    vault_jwt_file: str | None = None
    vault_auth_mount: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    vault_mount: str = "secret"
    vault_timeout: float = 5.0
    vault_concurrency: int = 32
    nats_url: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    nats_prefix: str = "secrets"
    nats_replicas: int = 1
    oidc_algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    oidc_leeway: float = 30.0
    oidc_max_token_lifetime: float = 86400.0
    # Seconds between scheduled JWKS refetches: a withdrawn key is refused at most this late.
    oidc_jwks_refresh: float = 300.0
    # HTTPS: both PEM files, or neither (plain HTTP).
    tls_cert: str | None = None
    tls_key: str | None = None
    # NATS: a credentials file (user JWT + NKEY seed), and TLS (CA bundle, client cert + key).
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    # TLS from the first byte (the server's tls block needs `handshake_first: true`).
    nats_tls_first: bool = False
    # Connections and requests one worker serves at once; beyond it new ones get 503.
    limit_concurrency: int = 2048
    # Processes serving the one port (SO_REUSEPORT), each a full instance: service/workers.py.
    workers: int = 1
    cache_ttl: float = 300.0
    cache_fallback_ttl: float = 5.0
    vault_poll_interval: float = 10.0
    cache_max_entries: int = 10000
    max_body_bytes: int = 65536
    log_level: str = "INFO"
    audit_sink: str = "stdout"  # "stdout" | "file:<path>" | "none"
    audit_fail_closed: str = "writes"  # "writes" | "all" | "none"
    metrics_port: int = 0  # 0: /metrics on the main port
    metrics_role: str | None = None  # a role a bearer token must hold to read /metrics
    # Rotation: seconds between walks of Vault for the paths the rules schedule, and how long a
    # run holds a path before another instance may take it over (its instance died).
    rotation_scan_interval: float = 30.0
    rotation_lease: float = 60.0
    # Seconds between sweeps turning change requests past their time `expired`.
    approval_sweep_interval: float = 30.0
    # Watch streams (SSE): seconds between keep-alive comments, streams per instance and per
    # caller (429 beyond), events queued for one stream before a slow reader is cut off.
    watch_heartbeat: float = 15.0
    watch_max_streams: int = 2000
    watch_max_per_caller: int = 16
    watch_queue: int = 256
    instance_id: str = msgspec.field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __repr__(self) -> str:
        # The Vault token and AppRole secret id are credentials: never printed; nor is a
        # `user:password@` in the Vault, NATS or issuer URLs.
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.__rich_repr__()) + ")"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        hidden = ("vault_token", "vault_secret_id")
        urls = ("vault_addr", "vault_addrs", "nats_url", "oidc_issuer")
        shown: list[tuple[str, Any]] = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in hidden and value:
                value = "**redacted**"
            elif name in urls:
                value = (
                    redact_url(value)
                    if isinstance(value, str)
                    else tuple(redact_url(url) for url in value)
                )
            shown.append((name, value))
        return shown

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Read SECRETS_* variables; SECRETS_CONFIG may name a TOML file of the same keys.

        The environment wins over the file. File keys may be written `SECRETS_PORT` or `port`.
        """
        values: dict[str, Any] = {}
        config_file = environ.get("SECRETS_CONFIG")
        if config_file:
            values.update(_read_toml(config_file))
        for key, raw in environ.items():
            # An empty variable counts as unset: it neither overrides the file nor the default.
            if key.startswith("SECRETS_") and key != "SECRETS_CONFIG" and raw != "":
                values[key] = raw
        return cls._build(values)

    @classmethod
    def _build(cls, values: Mapping[str, Any]) -> Settings:
        r = _Reader(values)
        vault_addrs = r.get("SECRETS_VAULT_ADDR", _vault_urls, required=True)
        token = r.get("SECRETS_VAULT_TOKEN", _nonempty)
        role_id = r.get("SECRETS_VAULT_ROLE_ID", _nonempty)
        secret_id = r.get("SECRETS_VAULT_SECRET_ID", _nonempty)
        vault_auth = _vault_auth(r, token, role_id, secret_id)
        kwargs: dict[str, Any] = {
            **vault_auth,
            "vault_addr": vault_addrs[0],
            "vault_addrs": vault_addrs,
            "vault_token": token,
            "vault_role_id": role_id,
            "vault_secret_id": secret_id,
            # Kept exactly: OIDC compares issuers byte for byte, trailing slash included.
            "oidc_issuer": r.get("SECRETS_OIDC_ISSUER", _url, required=True),
            "oidc_audience": r.get("SECRETS_OIDC_AUDIENCE", _nonempty, required=True),
            "policy_file": r.get("SECRETS_POLICY_FILE", _nonempty, required=True),
        }
        optional: dict[str, Callable[[Any], Any]] = {
            "host": _nonempty,
            "port": _int_between(0, 65535),
            "vault_mount": _mount,
            "vault_timeout": _positive_float,
            "vault_concurrency": _int_between(1, 1024),
            "nats_url": _nats_urls,
            "nats_prefix": _subject_token,
            "nats_replicas": _int_between(1, 5),
            "oidc_algorithms": _algorithms,
            "oidc_leeway": _nonnegative_float,
            "oidc_max_token_lifetime": _positive_float,
            "oidc_jwks_refresh": _positive_float,
            "tls_cert": _readable_file,
            "tls_key": _readable_file,
            "nats_creds": _readable_file,
            "nats_tls_ca": _readable_file,
            "nats_tls_cert": _readable_file,
            "nats_tls_key": _readable_file,
            "nats_tls_first": _boolean,
            "limit_concurrency": _int_between(1, 1_000_000),
            "workers": _int_between(1, 256),
            "cache_ttl": _nonnegative_float,
            "cache_fallback_ttl": _nonnegative_float,
            "vault_poll_interval": _nonnegative_float,
            "cache_max_entries": _int_between(0, 10_000_000),
            "max_body_bytes": _int_between(1024, 64 * 1024 * 1024),
            "log_level": _log_level,
            "audit_sink": _audit_sink,
            "audit_fail_closed": _one_of("writes", "all", "none"),
            "metrics_port": _int_between(0, 65535),
            "metrics_role": _nonempty,
            "rotation_scan_interval": _positive_float,
            "rotation_lease": _positive_float,
            "approval_sweep_interval": _positive_float,
            "watch_heartbeat": _positive_float,
            "watch_max_streams": _int_between(1, 1_000_000),
            "watch_max_per_caller": _int_between(1, 100_000),
            "watch_queue": _int_between(1, 1_000_000),
            "instance_id": _subject_token,
        }
        for name, parse in optional.items():
            value = r.get("SECRETS_" + name.upper(), parse)
            if value is not None:
                kwargs[name] = value
        metrics_port = kwargs.get("metrics_port", 0)
        if metrics_port and metrics_port == kwargs.get("port", 8080):
            raise ConfigError("SECRETS_METRICS_PORT", "must differ from SECRETS_PORT (0: share it)")
        _check_workers(kwargs.get("workers", 1), kwargs.get("port", 8080), metrics_port)
        _both_or_neither(kwargs, "tls_cert", "tls_key")
        _both_or_neither(kwargs, "nats_tls_cert", "nats_tls_key")
        return cls(**kwargs)


def _check_workers(workers: int, port: int, metrics_port: int) -> None:
    """Several workers share one fixed port; worker k serves /metrics on metrics_port + k."""
    if workers == 1:
        return
    if port == 0:
        raise ConfigError("SECRETS_PORT", "must be a fixed port (not 0) with SECRETS_WORKERS > 1")
    last = metrics_port + workers - 1
    if metrics_port and (last > 65535 or metrics_port <= port <= last):
        raise ConfigError(
            "SECRETS_METRICS_PORT",
            f"worker k serves /metrics on SECRETS_METRICS_PORT + k: {metrics_port} to {last} "
            f"must be ports and must not hold SECRETS_PORT",
        )


def _vault_auth(
    r: _Reader, token: str | None, role_id: str | None, secret_id: str | None
) -> dict[str, Any]:
    """SECRETS_VAULT_AUTH and what its method needs. Unset, it is `approle` when both AppRole
    ids are given (as before the setting existed), else `token`."""
    method = r.get("SECRETS_VAULT_AUTH", _one_of("token", "approle", "jwt"))
    if method is None and not token and not (role_id and secret_id):
        raise ConfigError(
            "SECRETS_VAULT_TOKEN",
            "required (or SECRETS_VAULT_ROLE_ID and SECRETS_VAULT_SECRET_ID for AppRole)",
        )
    method = method or ("approle" if role_id and secret_id else "token")
    if method == "token" and not token:
        raise ConfigError("SECRETS_VAULT_TOKEN", "required with SECRETS_VAULT_AUTH=token")
    if method == "approle":
        for key, value in (("ROLE_ID", role_id), ("SECRET_ID", secret_id)):
            if not value:
                raise ConfigError(
                    f"SECRETS_VAULT_{key}", "required with SECRETS_VAULT_AUTH=approle"
                )
    role = r.get("SECRETS_VAULT_ROLE", _nonempty)
    jwt_file = r.get("SECRETS_VAULT_JWT_FILE", _readable_file)
    if method == "jwt":
        for key, value in (("ROLE", role), ("JWT_FILE", jwt_file)):
            if not value:
                raise ConfigError(f"SECRETS_VAULT_{key}", "required with SECRETS_VAULT_AUTH=jwt")
    return {
        "vault_auth": method,
        "vault_role": role,
        "vault_jwt_file": jwt_file,
        "vault_auth_mount": r.get("SECRETS_VAULT_AUTH_MOUNT", _mount),
    }


def _both_or_neither(kwargs: Mapping[str, Any], first: str, second: str) -> None:
    if bool(kwargs.get(first)) != bool(kwargs.get(second)):
        missing = second if kwargs.get(first) else first
        other = first if missing == second else second
        raise ConfigError(f"SECRETS_{missing.upper()}", f"required with SECRETS_{other.upper()}")


class _Reader:
    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values

    def get(self, key: str, parse: Callable[[Any], T], *, required: bool = False) -> T:
        raw = self.values.get(key)
        if raw is None or raw == "":
            if required:
                raise ConfigError(key, "required")
            return None  # type: ignore[return-value]
        try:
            return parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(key, str(exc)) from None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("SECRETS_CONFIG", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("SECRETS_CONFIG", f"{path} is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("SECRETS_CONFIG", f"{path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.upper()
        name = name if name.startswith("SECRETS_") else "SECRETS_" + name
        if isinstance(value, list):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            out[name] = str(value).lower()
        else:
            out[name] = str(value)
    return out


def _nonempty(v: Any) -> str:
    s = str(v).strip()
    if not s:
        raise ValueError("must not be empty")
    return s


def _readable_file(v: Any) -> str:
    s = _nonempty(v)
    try:
        with open(s, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {s!r}: {exc.strerror}") from None
    return s


def _url(v: Any) -> str:
    s = _nonempty(v)
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, got {s!r}")
    return s


def _vault_urls(v: Any) -> tuple[str, ...]:
    """One Vault address, or the nodes of a cluster, comma-separated: http(s) URLs."""
    urls = tuple(_url(u).rstrip("/") for u in str(v).split(",") if u.strip())
    if not urls:
        raise ValueError("must list at least one http(s) URL")
    if len(set(urls)) != len(urls):
        raise ValueError("lists a node twice")
    return urls


def _int_between(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        try:
            n = int(str(v).strip())
        except ValueError:
            raise ValueError(f"must be an integer, got {v!r}") from None
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {n}")
        return n

    return parse


def _float(v: Any) -> float:
    try:
        return float(str(v).strip())
    except ValueError:
        raise ValueError(f"must be a number, got {v!r}") from None


def _positive_float(v: Any) -> float:
    f = _float(v)
    if not f > 0:
        raise ValueError(f"must be greater than 0, got {f}")
    return f


def _nonnegative_float(v: Any) -> float:
    f = _float(v)
    if not f >= 0:
        raise ValueError(f"must be 0 or more, got {f}")
    return f


def _mount(v: Any) -> str:
    s = _nonempty(v).strip("/")
    if not s or any(not part for part in s.split("/")):
        raise ValueError(f"not a mount path: {v!r}")
    return s


def _nats_urls(v: Any) -> tuple[str, ...]:
    urls = tuple(u.strip() for u in str(v).split(",") if u.strip())
    if not urls:
        raise ValueError("must list at least one server")
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.netloc:
            raise ValueError(f"not a NATS URL: {redact_url(u)!r}")
    return urls


def _subject_token(v: Any) -> str:
    s = _nonempty(v)
    if any(c in s for c in " \t\r\n*>") or s.startswith(".") or s.endswith(".") or ".." in s:
        raise ValueError(f"not a valid NATS subject prefix: {s!r}")
    return s


def _algorithms(v: Any) -> tuple[str, ...]:
    allowed = DEFAULT_ALGORITHMS
    algs = tuple(a.strip() for a in str(v).split(",") if a.strip())
    bad = [a for a in algs if a not in allowed]
    if bad or not algs:
        raise ValueError(f"only asymmetric algorithms are allowed ({', '.join(allowed)})")
    return algs


def _audit_sink(v: Any) -> str:
    s = _nonempty(v)
    if s in ("stdout", "none"):
        return s
    if s.startswith("file:") and s[5:].strip():
        return "file:" + s[5:].strip()
    raise ValueError(f"must be stdout, none or file:<path>, got {s!r}")


def _boolean(v: Any) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {v!r}")


def _one_of(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {v!r}")
        return s

    return parse


def _log_level(v: Any) -> str:
    s = str(v).strip().upper()
    if s not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return s
