"""systemd: sd_notify READY / STATUS / WATCHDOG / STOPPING over ``$NOTIFY_SOCKET`` with a plain
datagram socket."""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["SystemdNotifier"]

log = logging.getLogger("rksmolvlm.server")


# ==============================================================================================
# systemd: sd_notify over $NOTIFY_SOCKET
# ==============================================================================================
class SystemdNotifier:
    """sd_notify(3) without libsystemd: newline-separated assignments in one datagram to
    ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace). A no-op outside systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._warned = False
        self._stopping = False

    @classmethod
    def from_environ(cls, environ: dict | None = None) -> "SystemdNotifier":
        env = os.environ if environ is None else environ
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and int(usec) > 0 and pid in ("", str(os.getpid())) else None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2 / 1e6 if self.watchdog_usec else None

    def notify(self, message: str) -> bool:
        if not self.address:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(target)
                sock.sendall(message.encode())
            return True
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s (%s)", self.address, exc)
                self._warned = True
            return False

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        if self._stopping:
            return False
        self._stopping = True
        return self.notify(f"STOPPING=1\nSTATUS={status}")
