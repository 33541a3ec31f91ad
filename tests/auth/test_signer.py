"""RSA token signatures made in the signer child process (``DHP_TOKEN_SIGNER=process``): tokens it signs
verify against the JWKS, it follows key rotation, a killed child is replaced and no request fails meanwhile,
shutdown leaves no process behind, and ``inline`` never starts one."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from joserfc import jws, jwt
from joserfc.jwk import KeySet, RSAKey

from dhp.auth import signer as signer_mod
from dhp.auth.signer import ProcessSigner
from tests.auth.conftest import SSO, make_sso
from tests.conftest import LiveServer


def _keys(sso: SSO) -> KeySet:
    return KeySet.import_key_set(httpx.get(sso.base + "/oauth/jwks").json())


def _issue(sso: SSO, client: dict[str, str]) -> str:
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **client})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def _child_running(sso: SSO, client: dict[str, str], timeout: float = 30) -> int:
    """Issue tokens until the child process signs them; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _issue(sso, client)
        s = sso.state.signer
        if s.running:
            return int(s._proc.pid)
        time.sleep(0.05)
    raise AssertionError("the signer process never started")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.fixture(scope="module")
def own_sso(start_server: Callable[..., LiveServer], new_db_url: Callable[[str], str]) -> SSO:
    """A server of its own: these tests kill its signer process."""
    return make_sso(start_server, new_db_url("sqlite"))


def test_child_signs_tokens_that_verify(own_sso: SSO) -> None:
    c = own_sso.create_client("system/Patient.rs")
    pid = _child_running(own_sso, c)
    assert pid != os.getpid() and _alive(pid)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().endswith(b"dhp/auth/signer_child.py\x00")
    before = own_sso.state.signer._next
    tokens = [_issue(own_sso, c) for _ in range(5)]
    assert own_sso.state.signer._next == before + 5  # all five went through the child
    keys = _keys(own_sso)
    active = own_sso.state.signing["RS256"]
    for t in tokens:
        header = jws.extract_compact(t.encode()).headers()
        assert header == {"alg": "RS256", "kid": str(active.kid), "typ": "at+jwt"}
        claims = jwt.decode(t, keys, algorithms=["RS256"]).claims
        assert claims["client_id"] == c["client_id"] and claims["scope"] == "system/Patient.rs"
        assert httpx.get(own_sso.fhir + "/Patient", headers={"Authorization": f"Bearer {t}"}).status_code == 200
    assert len(set(tokens)) == 5


def test_child_follows_key_rotation(own_sso: SSO) -> None:
    c = own_sso.create_client("system/Patient.rs")
    pid = _child_running(own_sso, c)
    r = httpx.post(own_sso.base + "/admin/keys/rotate", headers={"Authorization": "Bearer " + own_sso.admin_token()})
    assert r.status_code == 200, r.text
    new_kid = r.json()["kid"]
    tok = _issue(own_sso, c)
    assert own_sso.state.signer.running and own_sso.state.signer._proc.pid == pid  # the same child signed it
    assert jws.extract_compact(tok.encode()).headers()["kid"] == new_kid
    assert jwt.decode(tok, _keys(own_sso), algorithms=["RS256"]).claims["client_id"] == c["client_id"]


def test_killed_child_is_replaced_and_no_request_fails(own_sso: SSO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signer_mod, "RESTART_AFTER", 0.3)
    c = own_sso.create_client("system/Patient.rs")
    pid = _child_running(own_sso, c)

    async def burst() -> list[int]:
        async with httpx.AsyncClient() as h:
            async def one() -> int:
                r = await h.post(own_sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c})
                return r.status_code
            tasks = [asyncio.create_task(one()) for _ in range(40)]
            await asyncio.sleep(0.01)
            os.kill(pid, signal.SIGKILL)  # while requests are in flight
            return list(await asyncio.gather(*tasks))

    assert asyncio.run(burst()) == [200] * 40
    keys = _keys(own_sso)
    assert jwt.decode(_issue(own_sso, c), keys, algorithms=["RS256"]).claims["client_id"] == c["client_id"]
    new_pid = _child_running(own_sso, c)
    assert new_pid != pid and not _alive(pid)
    assert jwt.decode(_issue(own_sso, c), keys, algorithms=["RS256"]).claims["client_id"] == c["client_id"]


def test_signer_in_process_concurrency_and_close() -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256"}, private=True)
    other = RSAKey.generate_key(2048, parameters={"kid": "k2", "alg": "RS256"}, private=True)
    inline_calls: list[int] = []

    def fallback(header: dict[str, Any], claims: dict[str, Any], k: Any) -> str:
        inline_calls.append(1)
        return jwt.encode(header, claims, k)

    async def go() -> tuple[list[str], int | None]:
        s = ProcessSigner(fallback)
        await s.sign({"alg": "RS256", "kid": "k1"}, {"n": -1}, key)  # starts the child
        for _ in range(300):
            if s.running:
                break
            await asyncio.sleep(0.05)
        assert s.running
        inline_calls.clear()
        proc = s._proc
        assert proc is not None
        out = await asyncio.gather(*(s.sign({"alg": "RS256", "kid": "k1" if i % 2 else "k2"}, {"n": i},
                                            key if i % 2 else other) for i in range(200)))
        assert not inline_calls  # every one signed by the child
        # A child that cannot sign one (here: a kid it was never sent) answers with an error; the request still
        # gets its token, signed in-process, and the child goes on.
        third = RSAKey.generate_key(2048, parameters={"kid": "k3", "alg": "RS256"}, private=True)
        s._kids.add("k3")
        odd = await s.sign({"alg": "RS256", "kid": "k3"}, {"n": "odd"}, third)
        assert jwt.decode(odd, third).claims == {"n": "odd"} and inline_calls == [1]
        assert s.running and s._proc is proc
        assert jwt.decode(await s.sign({"alg": "RS256", "kid": "k1"}, {"n": 0}, key), key).claims == {"n": 0}
        assert inline_calls == [1]
        await s.close()
        # After close: no child, and signing still works (in-process), without starting another child.
        late = await s.sign({"alg": "RS256", "kid": "k1"}, {"n": 999}, key)
        assert jwt.decode(late, key).claims == {"n": 999}
        await asyncio.sleep(0.1)
        assert not s.running and s._starting is None
        return list(out), proc.returncode

    tokens, code = asyncio.run(go())
    assert code is not None  # the child exited
    keys = KeySet([key, other])
    for i, t in enumerate(tokens):
        assert jwt.decode(t, keys, algorithms=["RS256"]).claims == {"n": i}
        assert jws.extract_compact(t.encode()).headers()["kid"] == ("k1" if i % 2 else "k2")


def test_inline_signer_setting(start_server: Callable[..., LiveServer], new_db_url: Callable[[str], str]) -> None:
    sso = make_sso(start_server, new_db_url("sqlite"), DHP_TOKEN_SIGNER="inline")
    c = sso.create_client("system/Patient.rs")
    for _ in range(5):
        tok = _issue(sso, c)
    assert sso.state.signer is None
    assert jwt.decode(tok, _keys(sso), algorithms=["RS256"]).claims["client_id"] == c["client_id"]


def test_unknown_signer_setting_is_refused() -> None:
    from types import SimpleNamespace

    from dhp.auth.core import AuthState

    server = SimpleNamespace(store=None, settings=SimpleNamespace(token_alg="RS256", token_lifetime=3600,
                                                                  token_signer="threads"))
    with pytest.raises(ValueError, match="DHP_TOKEN_SIGNER"):
        AuthState(server)
