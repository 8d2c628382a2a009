"""A fault-injecting TCP proxy for loopback tests: this kernel has no `netem`, so a slow or
lossy link between a SuperNode and the SuperLink is made here, above TCP.

    with FaultyLink(target_port, Link(latency=0.1, bandwidth=2e6, reset_every=20)) as link:
        start a SuperNode with --superlink 127.0.0.1:{link.port}

Each direction of each connection is a delay line: a chunk read at time t is written at
t + latency, then paced to `bandwidth` bytes/s. `refuse` is the chance a new connection is
cut at once; `reset_every` cuts each live connection with an RST after between 0.5 and 1.5
times that many seconds, so the client sees resets mid-stream, as from a flaky NAT or
mobile link. Faults are drawn from `seed` in the order connections arrive, so a run sees the
same sequence (with seed 1 and refuse 0.2, the first connection is refused). TLS passes
through untouched (the proxy never reads the bytes).
The proxy runs its own asyncio loop in a daemon thread, so synchronous tests can use it.
"""
from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Link:
    latency: float = 0.0  # seconds added one way, to every chunk
    bandwidth: float = 0.0  # bytes per second per direction (0: unlimited)
    refuse: float = 0.0  # probability that a new connection is cut at once
    reset_every: float = 0.0  # a live connection is reset after about this many seconds (0: never)
    seed: int = 0


@dataclass
class Counters:
    connections: int = 0
    refused: int = 0
    resets: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN: the peer gets 'connection reset'."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultyLink:
    def __init__(self, target_port: int, link: Link, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.link = link
        self.counters = Counters()
        self.rng = random.Random(link.seed)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faulty-link", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FaultyLink":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._shutdown)
        self._thread.join(10)

    def __enter__(self) -> "FaultyLink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopped.wait()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _shutdown(self) -> None:
        self._stopped.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ one connection

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Both draws before the first await: connection k always gets the k-th pair.
        refused = self.rng.random() < self.link.refuse
        lifetime = self.rng.uniform(0.5, 1.5) * self.link.reset_every
        self.counters.add(connections=1)
        if refused:
            self.counters.add(refused=1)
            _reset(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)
            return
        pipes = [self._spawn(self._pipe(client_r, server_w, "bytes_up")),
                 self._spawn(self._pipe(server_r, client_w, "bytes_down"))]
        if self.link.reset_every > 0:
            pipes.append(self._spawn(self._reset_later(lifetime, client_w, server_w)))
        self._spawn(self._close_when_done(pipes, client_w, server_w))

    async def _close_when_done(self, pipes, client_w, server_w) -> None:
        """A clean end of one direction waits for the other; an error in either ends both."""
        try:
            pending = set(pipes[:2])
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(task.cancelled() or task.exception() or not task.result() for task in done):
                    break
        finally:
            for task in pipes:
                task.cancel()
            for writer in (client_w, server_w):
                writer.transport.abort()

    async def _reset_later(self, delay: float, client_w, server_w) -> None:
        await asyncio.sleep(delay)
        self.counters.add(resets=1)
        _reset(client_w)
        _reset(server_w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> bool:
        """Reader -> delay line -> paced writer. True: the reader's EOF was passed on."""
        line: asyncio.Queue = asyncio.Queue()
        sender = self._spawn(self._send(line, writer, counter))
        try:
            while data := await reader.read(CHUNK):
                if sender.done():  # the far side is gone
                    return False
                line.put_nowait((time.monotonic() + self.link.latency, data))
        except (ConnectionError, OSError):
            sender.cancel()
            return False
        line.put_nowait((time.monotonic() + self.link.latency, b""))
        return await sender

    async def _send(self, line: asyncio.Queue, writer: asyncio.StreamWriter, counter: str) -> bool:
        rate = self.link.bandwidth
        step = max(1, int(rate / 50)) if rate else CHUNK  # ~20 ms slices under a cap
        try:
            while True:
                due, data = await line.get()
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    writer.write_eof()
                    return True
                for start in range(0, len(data), step):
                    piece = data[start:start + step]
                    writer.write(piece)
                    await writer.drain()
                    self.counters.add(**{counter: len(piece)})
                    if rate:
                        await asyncio.sleep(len(piece) / rate)
        except (ConnectionError, OSError, RuntimeError):
            return False
