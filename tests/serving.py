"""Waiting for a `dhp serve` subprocess to answer."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_serving(proc: subprocess.Popen[str], port: int, timeout: float = 240) -> None:
    """Until ``/healthz`` answers 200; fails with the server's stderr if it exits first."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "dhp serve did not start"
        time.sleep(0.2)
