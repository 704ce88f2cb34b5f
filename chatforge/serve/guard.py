"""What stands between the network and the server's routes (serve/app.py uses it).

- Host check (`HostCheck`): a web page the user happens to open can point a name it controls at
  127.0.0.1 (DNS rebinding) and then talk to the server as a same-origin page. Its requests carry
  that name in `Host`, so only the names the server is meant to be reached by are answered: IP
  literals, `localhost`, the bound name, this machine's names when bound to every address, and
  `--allowed-hosts`.
- Who may listen without a key (`check_exposure`): an address other than loopback needs --api-key
  or an explicit --allow-no-key.
- Connections (`Connections`, the uvicorn protocol it makes): the server counts its open
  connections, caps them (--max-connections) and gives a client --read-timeout seconds to send a
  request's headers. At the cap a new connection evicts the oldest one that is idle or still
  sending headers, so slow or idle clients can neither grow memory nor lock out /health; when every
  connection is busy with a request, the newcomer gets a 503. The body has its own timeout in the
  route (the same --read-timeout).
- Counters for /health and /metrics (`metrics_text`, `resident_bytes`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass, field

from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def default_allowed_hosts(bind_host: str, extra: list[str]) -> list[str]:
    """The Host names answered when bound to `bind_host` (IP literals are always answered)."""
    names = [*LOOPBACK_NAMES, *extra]
    if bind_host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
    elif not _is_ip(bind_host):
        names.append(bind_host)
    return sorted({n.lower().rstrip(".") for n in names if n})


def check_exposure(host: str, api_key: str | None, allow_no_key: bool) -> str | None:
    """None when `host` may be served as configured; else the one-line reason it may not."""
    if is_loopback(host) or api_key or allow_no_key:
        return None
    return (f"--host {host} makes the model usable by anyone who can reach this machine, and no key is "
            "set; pass --api-key KEY (or set CHATFORGE_API_KEY), or --allow-no-key to serve it open anyway")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header, without the port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


def host_allowed(header: str | None, allowed: list[str]) -> bool:
    if header is None or "*" in allowed:  # no Host: not a browser (every browser sends one)
        return True
    name = host_name(header)
    return _is_ip(name) or name in allowed or name.endswith(".localhost")


class HostCheck:
    """ASGI middleware: a request whose Host is not an allowed name gets a 400 (see the docstring)."""

    def __init__(self, app, allowed: list[str], refuse):
        self.app, self.allowed, self.refuse = app, allowed, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"host")
            if not host_allowed(None if header is None else header.decode("latin-1"), self.allowed):
                return await self.refuse(header.decode("latin-1"))(scope, receive, send)
        return await self.app(scope, receive, send)


# ---- connections --------------------------------------------------------------------------------

@dataclass
class Connections:
    """The cap on open connections and the read timeout, and the connections open now (by the
    protocol that `protocol()` makes for uvicorn)."""
    max_open: int = 1024
    read_timeout: float = 20.0
    open: dict = field(default_factory=dict)  # protocol -> None, oldest first
    evicted: int = 0
    refused: int = 0

    def count(self) -> int:
        return len(self.open)

    def protocol(self) -> type:
        """The uvicorn HTTP protocol class that counts and caps connections into this object."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})


BUSY_REPLY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n%s")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a deadline for a request's headers."""
    guard: Connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._idle_cycle = None  # the request cycle that was current when the deadline was set
        self._refused = False
        guard = self.guard
        if len(guard.open) >= guard.max_open and not self._evict_one():
            guard.refused += 1
            self._refused = True
            body = json.dumps({"error": {"message": f"the server has --max-connections {guard.max_open} open, "
                                                   "all busy with requests; retry in a moment",
                                         "type": "server_busy", "param": None, "code": "too_many_connections"}})
            transport.write(BUSY_REPLY % (len(body), body.encode()))
            # closed a moment later, its request read and dropped meanwhile: closing with unread data
            # would reset the connection, and the client might never see the 503
            self.loop.call_later(0.5, transport.close)
            return
        guard.open[self] = None
        self._arm_deadline()

    def connection_lost(self, exc) -> None:
        self.guard.open.pop(self, None)
        self._disarm_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._idle_cycle:  # a request's headers are in
            self._disarm_deadline()

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may start a pipelined request at once
        if self.cycle is finished and not self.transport.is_closing():
            self._arm_deadline()

    def _sending_headers(self) -> bool:
        """Idle, or partway through a request's headers (not yet handed to the app)."""
        return self.cycle is None or self.cycle.response_complete

    def _evict_one(self) -> bool:
        """Close the oldest connection that is idle or still sending headers; whether one was."""
        for other in self.guard.open:
            if other._sending_headers():
                self.guard.open.pop(other)
                other._disarm_deadline()
                other.transport.close()
                self.guard.evicted += 1
                return True
        return False

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._idle_cycle = self.cycle
        self._deadline = self.loop.call_later(self.guard.read_timeout, self._read_timed_out)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def server_config(app, connections: Connections, timeout_graceful_shutdown: int = 5):
    """The uvicorn Config every chatforge server runs with (the CLI and ServerThread alike)."""
    import uvicorn

    return uvicorn.Config(app, http=connections.protocol(), access_log=False, log_level="warning",
                          timeout_graceful_shutdown=timeout_graceful_shutdown, timeout_keep_alive=5)


# ---- counters -----------------------------------------------------------------------------------

def resident_bytes(pid: int | str = "self") -> int | None:
    """A process's resident memory now (Linux; this one by default), else None."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


METRICS = {  # name -> (counters key, help)
    "chatforge_slots_busy": ("busy_slots", "rows being decoded for requests whose clients are still there"),
    "chatforge_requests_waiting": ("waiting", "requests waiting for a slot"),
    "chatforge_replicas_busy": ("busy", "engine replicas generating now"),
    "chatforge_connections_open": ("connections", "open HTTP connections"),
    "chatforge_connections_evicted_total": ("evicted", "idle or slow connections closed to make room"),
    "chatforge_connections_refused_total": ("refused", "connections refused at --max-connections"),
    "process_resident_memory_bytes": ("rss_bytes", "resident memory of the server process"),
    "chatforge_engine_resident_memory_bytes": ("engine_rss_bytes", "resident memory of the engine processes"),
}


def metrics_text(counters: dict) -> str:
    """`counters` in the Prometheus text format."""
    lines = []
    for name, (key, help_) in METRICS.items():
        if counters.get(key) is None:
            continue
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {counters[key]}"]
    return "\n".join(lines) + "\n"
