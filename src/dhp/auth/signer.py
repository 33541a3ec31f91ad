"""RSA token signatures in a child process.

An RSA-2048 signature is ~0.7–1 ms of CPU. Signed on the event loop it is half of what a token issue costs;
signed on a thread, each signature has to take the GIL back from a busy event loop, which hands it over only
every ``sys.getswitchinterval()`` (5 ms): a signing thread then managed ~160 signatures/s where it signs
1,400/s alone. A child process signs on another core with no GIL between it and the loop, and its answers
come back through a pipe that the event loop reads like any socket.

The child is ``signer_child.py`` beside this module, run as a script: it reads length-prefixed JSON requests
(``{"i": n, "k": kid, "j": private JWK (first use of a kid only), "h": header, "c": claims}``) on stdin and
answers ``{"i": n, "t": token}`` or ``{"i": n, "e": message}`` on stdout (that request is then signed
in-process). The JWS itself is made by joserfc in the child, exactly as
:meth:`dhp.auth.core.AuthState.sign` makes it in-process.

Keys pass only over the pipe to the process's own child. If the child cannot start or dies, the parent signs
in-process (the requests in flight are signed again: a signature can be made twice without harm) and starts
a new child at the next signature, no sooner than :data:`RESTART_AFTER` seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("dhp.auth")

CHILD = Path(__file__).with_name("signer_child.py")
RESTART_AFTER = 5.0  # seconds between attempts to start a child after one failed or died
_LEN = struct.Struct(">I")


class ProcessSigner:
    """Signs JWTs in a child process; ``fallback(header, claims, key)`` signs in-process meanwhile."""

    def __init__(self, fallback: Callable[[dict[str, Any], dict[str, Any], Any], str]) -> None:
        self._fallback = fallback
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[str], dict[str, Any], dict[str, Any], Any]] = {}
        self._kids: set[str] = set()  # keys the current child holds
        self._next = 0
        self._failed_at = -RESTART_AFTER
        self._closed = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._reader is not None

    async def sign(self, header: dict[str, Any], claims: dict[str, Any], key: Any) -> str:
        if not self.running:
            self._start_soon()
            return self._fallback(header, claims, key)
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        self._next += 1
        n = self._next
        kid = str(header.get("kid"))
        msg: dict[str, Any] = {"i": n, "k": kid, "h": header, "c": claims}
        if kid not in self._kids:
            msg["j"] = key.as_dict(private=True)
            self._kids.add(kid)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending[n] = (fut, header, claims, key)
        body = orjson.dumps(msg)
        try:
            proc.stdin.write(_LEN.pack(len(body)) + body)
        except (ConnectionError, RuntimeError) as e:
            self._lost(f"signer pipe closed: {e}")
        return await fut

    def _start_soon(self) -> None:
        if self._closed or self._starting is not None or time.monotonic() - self._failed_at < RESTART_AFTER:
            return
        self._starting = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        proc: asyncio.subprocess.Process | None = None
        try:
            # Run as a script (``-P``: its folder is not put on sys.path), not ``-m``: importing the dhp.auth
            # package would cost the child a second of start-up for code it never runs.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", str(CHILD), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert proc.stdout is not None
            # The child says it is ready once joserfc is imported: no request waits on its start-up.
            ready = await asyncio.wait_for(proc.stdout.readexactly(_LEN.size), 30)
            if _LEN.unpack(ready)[0] != 0:
                raise RuntimeError("unexpected greeting")
        except Exception as e:
            log.warning("token signer process did not start (%s); signing in-process", e)
            self._failed_at = time.monotonic()
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            return
        finally:
            self._starting = None
        if self._closed:
            await _stop(proc)
            return
        self._proc = proc
        self._kids = set()
        self._reader = asyncio.get_running_loop().create_task(self._read(proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        out = proc.stdout
        assert out is not None
        try:
            while True:
                size = _LEN.unpack(await out.readexactly(_LEN.size))[0]
                msg = orjson.loads(await out.readexactly(size))
                got = self._pending.pop(msg["i"], None)
                if got is None or got[0].done():
                    continue
                if "t" in msg:
                    got[0].set_result(msg["t"])
                    continue
                # The child could not sign this one (it should not happen): a token is still owed.
                log.warning("token signer process: %s; signed in-process", msg.get("e"))
                fut, header, claims, key = got
                try:
                    fut.set_result(self._fallback(header, claims, key))
                except Exception as e:
                    fut.set_exception(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # EOF or a garbled frame: the child is gone or unusable
            if self._proc is proc:
                self._lost(f"signer process ended ({type(e).__name__})")

    def _lost(self, why: str) -> None:
        """The child is gone: sign what it held in-process, start another later."""
        if not self._closed:
            log.warning("%s; signing in-process", why)
            self._failed_at = time.monotonic()
        proc, self._proc, self._reader = self._proc, None, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        pending, self._pending = self._pending, {}
        for fut, header, claims, key in pending.values():
            if fut.done():
                continue
            try:
                fut.set_result(self._fallback(header, claims, key))
            except Exception as e:
                fut.set_exception(e)

    async def close(self) -> None:
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        proc, reader = self._proc, self._reader
        if proc is None:
            return
        # Answers still on their way are read before the pipe closes; the rest are signed here.
        if self._pending and reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(asyncio.gather(
                    *(f for f, *_ in self._pending.values()), return_exceptions=True)), 5)
        self._proc = self._reader = None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        await _stop(proc)
        self._lost("closed")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(Exception):
            proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except Exception:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await proc.wait()
