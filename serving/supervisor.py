"""`cellinspect serve --workers N`: a listening socket of its own in every worker process.

uvicorn's own `--workers` binds one socket in the parent and every worker accepts from it.
Clients that keep their connection alive (line cameras, `wrk`) connect once, and with a
shared socket whichever worker wakes first accepts a burst of them: with 16 clients
connecting at once, two workers were measured splitting them 16/0, 15/1, 12/4 and 10/6.
The busier worker then saturates while the other idles, for as long as the connections
live (benchmarks/RESULTS.md). Here every worker binds its own socket with SO_REUSEPORT,
and the kernel spreads new connections over them by a hash of the connection's addresses.

uvicorn's supervisor is kept as it is (health checks, a dead worker replaced, SIGHUP,
SIGTTIN/SIGTTOU, graceful SIGTERM); only the worker it starts binds its own socket. The
parent holds a bound, never-listening socket on the port for the service's life: a second
service started on the same port finds it taken and refuses to start instead of quietly
sharing the port, and no other program can take the port between worker restarts.

The price: when a worker stops (a restart, SIGTTOU, shutdown), connections the kernel had
queued on its socket but the worker had not accepted yet are reset, where a shared socket
would have handed them to another worker. Linux 5.14+ migrates them instead with
`sysctl net.ipv4.tcp_migrate_req=1`.
"""

from __future__ import annotations

import socket
import sys

from uvicorn import Config
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess


def _socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def claim_port(host: str, port: int) -> socket.socket:
    """The parent's socket: the port must be free (OSError naming it otherwise); the socket
    returned is bound with SO_REUSEPORT, so the workers' sockets can join it, but never
    listens, so no connection is queued on it."""
    try:
        # A plain bind fails while anything holds the port, SO_REUSEPORT sockets included.
        _socket(host, port, reuse_port=False).close()
        return _socket(host, port, reuse_port=True)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class ReusePortProcess(multiprocess.Process):
    """A uvicorn worker that listens on a SO_REUSEPORT socket bound in its own process."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, [])  # nothing inherited: the child binds its own

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        # Runs in the worker (coverage does not follow it there; tests/serving/test_uvicorn.py
        # checks what it does).
        try:
            own = _socket(self.config.host, self.config.port, reuse_port=True)
        except OSError as exc:
            print(
                f"worker cannot bind {self.config.host}:{self.config.port}: {exc}", file=sys.stderr
            )
            sys.exit(STARTUP_FAILURE)  # the supervisor stops instead of restarting in a loop
        super().target([own])


def run_workers(config: Config) -> None:
    """Run `config.workers` uvicorn workers, each on its own socket, until told to stop."""
    if config.workers < 2 or config.uds is not None or config.fd is not None:
        raise ValueError("run_workers serves host:port with at least 2 workers")
    claimed = claim_port(config.host, config.port)
    original = multiprocess.Process
    multiprocess.Process = ReusePortProcess  # type: ignore[misc]  # what Multiprocess starts
    try:
        multiprocess.Multiprocess(config, sockets=[]).run()  # the workers bind their own
    finally:
        multiprocess.Process = original  # type: ignore[misc]
        claimed.close()
