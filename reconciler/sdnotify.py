"""systemd's notify protocol in a few lines of stdlib: READY=1, STOPPING=1, STATUS=..., WATCHDOG=1.

Without NOTIFY_SOCKET (not under systemd, or Type=simple) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        # An address starting with "@" lives in the abstract namespace: a leading NUL byte on Linux.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self.watchdog_interval_seconds = self._watchdog_interval(environ)

    @staticmethod
    def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
        """Half of WatchdogSec, as systemd advises; None when the watchdog is off or meant for another process."""
        try:
            microseconds = int(environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            return None
        watchdog_pid = environ.get("WATCHDOG_PID")
        if microseconds <= 0 or (watchdog_pid and watchdog_pid != str(os.getpid())):
            return None
        return microseconds / 2_000_000

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, message: str) -> bool:
        if not self._address:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), self._address)
        except OSError:
            # systemd gone or the socket closed: notification is best effort, never fatal.
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
