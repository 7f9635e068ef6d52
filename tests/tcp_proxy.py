"""A TCP proxy between the daemon and the real PostgreSQL that can stop forwarding: a frozen network.

It runs its own event loop in a thread, so that tests whose own loop blocks (the acceptance tests wait
with `time.sleep`) cannot freeze it by accident. While frozen, nothing is forwarded either way: bytes
already sent wait in the sockets' buffers, a new connection is accepted but not connected on, and a
closed end is not passed on, as with a network that stopped delivering (neither side learns of it).
`thaw()` delivers what waited and forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        # Set once bytes arrived that the freeze holds back: something waits on the frozen network.
        self.holding = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._call(lambda: self._stopped.set() if self._stopped is not None else None)
        self._thread.join(10)

    def dsn(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        parts = urlsplit(dsn)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

    @classmethod
    def to(cls, dsn: str) -> TcpProxy:
        """A proxy to the server of `dsn` (not started)."""
        parts = urlsplit(dsn)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def freeze(self) -> None:
        self.holding.clear()
        self._call(lambda: self._flowing.clear() if self._flowing is not None else None)

    def thaw(self) -> None:
        self._call(lambda: self._flowing.set() if self._flowing is not None else None)

    def _call(self, function: Callable[[], object]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(function)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._stopped = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def connected(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            assert self._flowing is not None
            await self._flowing.wait()
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                client_writer.close()
                return
            for source, sink in ((client_reader, server_writer), (server_reader, client_writer)):
                task = asyncio.create_task(self._pump(source, sink))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        server = await asyncio.start_server(connected, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopped.wait()
            server.close()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await source.read(65536)
                # Read while flowing, but frozen since: held until the network comes back.
                if data and not self._flowing.is_set():
                    self.holding.set()
                await self._flowing.wait()
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.close()
