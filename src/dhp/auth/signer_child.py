"""The token signer child process (see :mod:`dhp.auth.signer`): run as a script, it signs until stdin closes.

Requests and answers are length-prefixed (4 bytes, big-endian) JSON frames. Only joserfc and orjson are
imported: the child starts in a fraction of a second and holds nothing but the keys it is sent.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from typing import Any

import orjson
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

_LEN = struct.Struct(">I")


def serve() -> None:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    keys: dict[str, Any] = {}
    out.write(_LEN.pack(0))  # ready
    out.flush()
    while True:
        head = inp.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        msg = orjson.loads(inp.read(_LEN.unpack(head)[0]))
        try:
            if "j" in msg:
                jwk = msg["j"]
                keys[msg["k"]] = (RSAKey if jwk.get("kty") == "RSA" else ECKey).import_key(jwk)
            reply: dict[str, Any] = {"i": msg["i"], "t": jwt.encode(msg["h"], msg["c"], keys[msg["k"]])}
        except Exception as e:
            reply = {"i": msg.get("i"), "e": f"{type(e).__name__}: {e}"}
        body = orjson.dumps(reply)
        out.write(_LEN.pack(len(body)) + body)
        out.flush()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        serve()
