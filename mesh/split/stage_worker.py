"""`StageWorker`: the one thread that runs a stage host's compute, so the event loop keeps answering
heartbeats and HTTP while stages run (stages are not thread-safe either). Calls queued from the loop answer it
with one `call_soon_threadsafe`; direct tensor links are read, computed and answered on the worker itself."""

from __future__ import annotations

import asyncio
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from shoal.mesh.split import wire
from shoal.mesh.split.arrival import Arrivals, wait_readable
from shoal.mesh.split.config import SplitConfig
from shoal.mesh.split.hosted import HostError
from shoal.mesh.split.tensor_link_server import ServerLink


class StageWorker:
    """One daemon thread running stage calls in order: calls queued from the loop (`run` awaits the result)
    and the requests of direct tensor links (`serve_link`), which it reads, computes and answers itself.

    The thread waits in one `select` over its wake-up socket and the links' sockets. A queued call answers the
    loop with `loop.call_soon_threadsafe` straight into the awaiting future: one wake-up of the loop per call;
    a link request involves no event loop at all. While links stream decode steps, the wait for the next
    request polls around when it is due (`split.arrival`, at most `spin_s` a wait). `stop()` is idempotent;
    calls queued before it still run (they are stage closes)."""

    def __init__(self, name: str, spin_s: float = SplitConfig.link_spin_us / 1e6) -> None:
        self._arrivals = Arrivals(spin_s)
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: tuple[Any, ...] | None) -> None:
        self._queue.put(item)
        try:
            self._wake_write.send(b"\0")
        except BlockingIOError:  # wake-ups are pending already
            pass
        except OSError:  # the worker is gone (stopped): nothing waits for the item
            pass

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._stopped:
            raise HostError(wire.REFUSED, "the node is shutting down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._put((loop, future, fn, args))
        return await future

    def serve_link(self, link: ServerLink, handle: Callable[[ServerLink], bool]) -> None:
        """Any thread: read `link` on the worker from now on; `handle(link)` answers one request and returns
        False when the link is done (the worker then closes it)."""
        if self._stopped:
            link.close()
            return
        self._put(("link", link, handle))

    def _serve(self) -> None:
        links: list[ServerLink] = []
        answered = 0.0  # when the last link request was answered: the next one is due a beat later
        polling = self._arrivals.spin_s > 0
        try:
            while True:
                window = self._arrivals.window() if links and polling else None
                if window is not None:
                    wait_readable([self._wake_read, *(link.sock for link in links)], answered, window)
                events = self._selector.select()
                arrived = time.perf_counter() if polling else 0.0
                for key, _ in events:
                    if key.data is not None:
                        link, handle = key.data
                        done = not handle(link)
                        if polling:
                            self._arrivals.observe(arrived - answered)
                            answered = time.perf_counter()
                        if done:
                            self._selector.unregister(link.sock)
                            links.remove(link)
                            link.close()
                    elif not self._drain(links):
                        return
        finally:
            for link in links:
                link.close()
            self._selector.close()
            self._wake_read.close()
            self._wake_write.close()

    def _drain(self, links: list[ServerLink]) -> bool:
        """Run what was queued; False once `stop()` was."""
        try:
            self._wake_read.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            if item[0] == "link":
                _, link, handle = item
                self._selector.register(link.sock, selectors.EVENT_READ, (link, handle))
                links.append(link)
                continue
            loop, future, fn, args = item
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop closed while this call ran: nobody waits for it
                pass

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
