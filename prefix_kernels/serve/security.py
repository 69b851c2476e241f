"""Who may call what: API keys, the admin key, browser origins and hosts, adapter paths, prefix
names, and each client's share of the server."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os

from ..bank import validate_name
from .api import ApiError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_name(name) -> str:
    """A prefix name by the bank's rule (bank.validate_name), as a 400 for the client."""
    try:
        return validate_name(name)
    except ValueError:
        raise ApiError(400, "'name' must be 1-64 characters of A-Z a-z 0-9 . _ - (not only dots)",
                       param="name") from None


def _bearer(headers) -> str | None:
    auth = headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("X-Api-Key") or None


def _match(token: str | None, keys) -> str | None:
    """The key equal to token (constant-time per key, every key compared), or None."""
    found = None
    probe = (token or "").encode()
    for key in keys:
        if hmac.compare_digest(probe, key.encode()) and token is not None:
            found = key
    return found


def client_id(key: str | None, peer: str) -> str:
    """Whom a request counts against: its API key (hashed) when keys are set, else its address."""
    if key is not None:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return "addr:" + peer


class Access:
    """The server's access rules, from its flags."""

    def __init__(self, api_keys=(), admin_key: str | None = None, enable_admin: bool = False,
                 adapter_root: str | None = None, allowed_origins=(), allowed_hosts=(), bind_host: str = "127.0.0.1"):
        self.api_keys = tuple(k for k in api_keys if k)
        self.admin_key = admin_key or None
        self.enable_admin = bool(enable_admin)
        if self.enable_admin:
            if not self.admin_key:
                raise ValueError("--enable-admin needs an admin key: --admin-key or PREFIX_KERNELS_ADMIN_KEY")
            if self.admin_key in self.api_keys:
                raise ValueError("the admin key must differ from every API key")
            if not adapter_root:
                raise ValueError("--enable-admin needs --adapter-root: the folder adapters may be loaded from")
            if not os.path.isdir(adapter_root):
                raise ValueError(f"--adapter-root {adapter_root!r} is not a folder")
        self.adapter_root = os.path.realpath(adapter_root) if adapter_root else None
        self.allowed_origins = {o.rstrip("/") for o in allowed_origins}
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.loopback = is_loopback(bind_host)

    # -- checks, in the order a request meets them --------------------------------------------

    def check_host(self, headers) -> None:
        """DNS rebinding guard: on a loopback bind, the Host header must name the loopback (or an
        --allowed-host); elsewhere only --allowed-host restricts it."""
        host = headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if self.allowed_hosts:
            ok = name in self.allowed_hosts or (self.loopback and is_loopback(name))
        else:
            ok = not self.loopback or not host or is_loopback(name)
        if not ok:
            raise ApiError(403, f"Host {host[:100]!r} is not served here (--allowed-host)", code="host_not_allowed")

    def check_origin(self, headers) -> None:
        """A browser's cross-site request carries Origin: only --allowed-origin ones pass."""
        origin = headers.get("Origin")
        if origin is not None and origin.rstrip("/") not in self.allowed_origins:
            raise ApiError(403, f"Origin {origin[:100]!r} is not allowed (--allowed-origin)", code="origin_not_allowed")

    def cors_headers(self, headers) -> dict:
        origin = headers.get("Origin")
        if origin is None or origin.rstrip("/") not in self.allowed_origins:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Headers": "Authorization, Content-Type",
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS", "Access-Control-Max-Age": "600"}

    def check_api_key(self, headers) -> str | None:
        """The caller's API key (None when the server has none); 401 without a valid one."""
        if not self.api_keys:
            return None
        key = _match(_bearer(headers), self.api_keys)
        if key is None:
            raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return key

    def check_admin(self, headers) -> None:
        if not self.enable_admin:
            raise ApiError(403, "the admin routes are off: start the server with --enable-admin and --admin-key",
                           code="admin_disabled")
        if _match(_bearer(headers), (self.admin_key,)) is None:
            raise ApiError(401, "the admin key is required: send 'Authorization: Bearer ADMIN_KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def adapter_path(self, path) -> str:
        """The real path of an adapter folder named relative to --adapter-root; 400 when it would
        leave the root (.., an absolute path, a symlink pointing out)."""
        if not isinstance(path, str) or not path or len(path) > 1024 or "\x00" in path:
            raise ApiError(400, "'path' must name an adapter folder under the adapter root", param="path")
        if os.path.isabs(path):
            raise ApiError(400, "'path' must be relative to the adapter root", param="path")
        real = os.path.realpath(os.path.join(self.adapter_root, path))
        if os.path.commonpath([real, self.adapter_root]) != self.adapter_root or real == self.adapter_root:
            raise ApiError(400, f"'path' {path!r} is outside the adapter root", param="path")
        if not os.path.isdir(real):
            raise ApiError(400, f"'path' {path!r} is not an adapter folder under the adapter root", param="path")
        return real


class ClientLimits:
    """Each client's requests and max_tokens in flight (0 = no limit); loop thread only."""

    def __init__(self, max_requests: int = 0, max_tokens: int = 0):
        self.max_requests, self.max_tokens = int(max_requests), int(max_tokens)
        self._use: dict[str, list[int]] = {}

    def acquire(self, client: str, max_tokens: int) -> None:
        use = self._use.setdefault(client, [0, 0])
        if self.max_requests and use[0] + 1 > self.max_requests:
            self._drop_empty(client)
            raise ApiError(429, f"this client has {use[0]} requests in flight; the limit is {self.max_requests} "
                                f"(--client-max-requests)", code="client_limit", headers={"Retry-After": "1"})
        if self.max_tokens and use[1] + max_tokens > self.max_tokens:
            self._drop_empty(client)
            raise ApiError(429, f"this client has {use[1]} max_tokens in flight and asks {max_tokens} more; the "
                                f"limit is {self.max_tokens} (--client-max-tokens)", param="max_tokens",
                           code="client_limit", headers={"Retry-After": "1"})
        use[0] += 1
        use[1] += max_tokens

    def release(self, client: str, max_tokens: int) -> None:
        use = self._use.get(client)
        if use is not None:
            use[0] -= 1
            use[1] -= max_tokens
            self._drop_empty(client)

    def _drop_empty(self, client):
        if self._use.get(client) == [0, 0]:
            del self._use[client]
