"""Every error the issue lists: RFC 6749 §5.2 token errors, authorization errors (redirect-URI mismatch, PKCE,
code replay), bad bearer tokens on the FHIR API (missing, expired, tampered, wrong audience, revoked),
insufficient scope, and throttling of failed sign-ins."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from tests.auth.conftest import PASSWORD, REDIRECT, SSO, hidden, login_and_consent, pkce_pair

TOKEN = "/oauth/token"


def oauth_error(r: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error, body
    assert body["error_description"]
    assert r.headers["cache-control"] == "no-store"
    return body  # type: ignore[no-any-return]


def fhir_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error"


@pytest.fixture(scope="module")
def cc(sso: SSO) -> dict[str, str]:
    return sso.create_client("system/Patient.rs")


# ---------------------------------------------------------------------------------------------- token endpoint

def test_missing_grant_type_is_invalid_request(sso: SSO, cc: dict[str, str]) -> None:
    body = oauth_error(httpx.post(sso.base + TOKEN, data={**cc}), 400, "invalid_request")
    assert body["error_description"].startswith("Missing required parameter")
    oauth_error(httpx.post(sso.base + TOKEN, content=b"{}", headers={"Content-Type": "application/json"}), 400,
                "invalid_request")
    # A parameter given twice.
    oauth_error(httpx.post(sso.base + TOKEN, content=b"grant_type=client_credentials&grant_type=password",
                           headers={"Content-Type": "application/x-www-form-urlencoded"}), 400, "invalid_request")


def test_nul_character_in_credentials_is_a_client_error(any_sso: SSO) -> None:
    # PostgreSQL refuses U+0000 in text: that must surface as an RFC 6749 error, never a 5xx.
    for data in ({"grant_type": "client_credentials", "client_id": "a\x00b", "client_secret": "x"},
                 {"grant_type": "client_credentials", "client_id": "ab", "client_secret": "x\x00"}):
        r = httpx.post(any_sso.base + TOKEN, data=data)
        assert r.status_code in (400, 401), r.text
        assert r.json()["error"] in ("invalid_request", "invalid_client")
        assert r.headers["cache-control"] == "no-store"
    r = httpx.get(any_sso.base + "/oauth/authorize", params={
        "response_type": "code", "client_id": "a\x00b", "redirect_uri": REDIRECT, "scope": "openid",
        "state": "s", "code_challenge": "x" * 43, "code_challenge_method": "S256"})
    assert r.status_code == 400, r.text


def test_unsupported_grant_type(sso: SSO, cc: dict[str, str]) -> None:
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "password", "username": "a", "password": "b", **cc}),
                400, "unsupported_grant_type")


@pytest.mark.parametrize("how", ["wrong-secret", "unknown-client", "no-secret", "basic-wrong", "basic-garbage"])
def test_invalid_client(sso: SSO, cc: dict[str, str], how: str) -> None:
    data: dict[str, str] = {"grant_type": "client_credentials"}
    auth: Any = None
    headers: dict[str, str] = {}
    if how == "wrong-secret":
        data.update(client_id=cc["client_id"], client_secret="nope")
    elif how == "unknown-client":
        data.update(client_id="nobody", client_secret="nope")
    elif how == "no-secret":
        data.update(client_id=cc["client_id"])
    elif how == "basic-wrong":
        auth = (cc["client_id"], "nope")
    else:
        headers["Authorization"] = "Basic " + base64.b64encode(b"no-colon-here").decode()
    r = httpx.post(sso.base + TOKEN, data=data, auth=auth, headers=headers)
    body = oauth_error(r, 401, "invalid_client")
    assert r.headers["www-authenticate"].startswith("Basic")
    if how in ("wrong-secret", "unknown-client", "basic-wrong"):
        assert body == {"error": "invalid_client", "error_description": "Invalid client credentials"}


def test_invalid_scope(sso: SSO, cc: dict[str, str]) -> None:
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "client_credentials", "scope": "system/*.cruds",
                                                   **cc}), 400, "invalid_scope")  # beyond the registration
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "client_credentials", "scope": "system/Patient.xyz",
                                                   **cc}), 400, "invalid_scope")  # malformed
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "client_credentials", "scope": "user/Patient.rs",
                                                   **cc}), 400, "invalid_scope")  # user/ needs a user


def test_unauthorized_client_grant(sso: SSO) -> None:
    c = sso.create_client("system/*.rs", grant_types=["client_credentials"])
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "refresh_token", "refresh_token": "x", **c}), 400,
                "unauthorized_client")


def test_public_client_cannot_use_client_credentials(sso: SSO) -> None:
    c = sso.create_client("user/*.rs", public=True, redirect_uris=[REDIRECT])
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "client_credentials", **c}), 400,
                "unauthorized_client")


# ---------------------------------------------------------------------------------------------- authorization code

@pytest.fixture(scope="module")
def web(sso: SSO) -> dict[str, Any]:
    user = sso.create_user(fhir_user="Practitioner/x")
    c = sso.create_client("user/*.rs offline_access", redirect_uris=[REDIRECT, REDIRECT + "/other"])
    pub = sso.create_client("user/*.rs offline_access", public=True, redirect_uris=[REDIRECT])
    return {"user": user, "client": c, "public": pub}


def test_authorize_unknown_client_and_redirect_mismatch_show_a_page(sso: SSO, web: dict[str, Any]) -> None:
    base = {"response_type": "code", "scope": "user/*.rs", "state": "s"}
    r = httpx.get(sso.base + "/oauth/authorize", params={**base, "client_id": "nobody", "redirect_uri": REDIRECT})
    assert r.status_code == 400 and "invalid_client" in r.text and "location" not in r.headers
    r = httpx.get(sso.base + "/oauth/authorize", params={**base, "client_id": web["client"]["client_id"],
                                                         "redirect_uri": "http://evil.example/cb"})
    assert r.status_code == 400 and "redirect_uri" in r.text and "location" not in r.headers
    # Prefix matches are not matches either.
    r = httpx.get(sso.base + "/oauth/authorize", params={**base, "client_id": web["client"]["client_id"],
                                                         "redirect_uri": REDIRECT + "/other/x"})
    assert r.status_code == 400


@pytest.mark.parametrize("params,error", [
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"code_challenge": "a" * 43, "code_challenge_method": "plain"}, "invalid_request"),
    ({"scope": "user/*.bogus"}, "invalid_scope"),
    ({"scope": "system/*.rs"}, "invalid_scope"),
    ({"aud": "https://other.example/fhir"}, "invalid_request"),
])
def test_authorize_errors_redirect_back(sso: SSO, web: dict[str, Any], params: dict[str, str], error: str) -> None:
    q = {"response_type": "code", "client_id": web["client"]["client_id"], "redirect_uri": REDIRECT,
         "scope": "user/*.rs", "state": "xyz", **params}
    r = httpx.get(sso.base + "/oauth/authorize", params=q)
    assert r.status_code == 303, r.text
    back = parse_qs(urlsplit(r.headers["location"]).query)
    assert back["error"] == [error] and back["state"] == ["xyz"]


def test_public_client_requires_pkce(sso: SSO, web: dict[str, Any]) -> None:
    r = httpx.get(sso.base + "/oauth/authorize", params={
        "response_type": "code", "client_id": web["public"]["client_id"], "redirect_uri": REDIRECT,
        "scope": "user/*.rs", "state": "s"})
    assert r.status_code == 303
    back = parse_qs(urlsplit(r.headers["location"]).query)
    assert back["error"] == ["invalid_request"] and "PKCE" in back["error_description"][0]


def test_token_redirect_uri_mismatch(sso: SSO, web: dict[str, Any]) -> None:
    c = web["client"]
    q = login_and_consent(sso, c["client_id"], web["user"], scope="user/*.rs")
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "authorization_code", "code": q["code"][0],
                                                   "redirect_uri": REDIRECT + "/other", **c}), 400, "invalid_grant")


def test_missing_code_and_unknown_code(sso: SSO, web: dict[str, Any]) -> None:
    c = web["client"]
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "authorization_code", "redirect_uri": REDIRECT, **c}),
                400, "invalid_request")
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "authorization_code", "code": "made-up",
                                                   "redirect_uri": REDIRECT, **c}), 400, "invalid_grant")


def test_code_bound_to_client(sso: SSO, web: dict[str, Any]) -> None:
    q = login_and_consent(sso, web["client"]["client_id"], web["user"], scope="user/*.rs")
    other = sso.create_client("user/*.rs", redirect_uris=[REDIRECT])
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "authorization_code", "code": q["code"][0],
                                                   "redirect_uri": REDIRECT, **other}), 400, "invalid_grant")
    # The other client's attempt did not burn the code: its rightful client still redeems it, once.
    r = httpx.post(sso.base + TOKEN, data={"grant_type": "authorization_code", "code": q["code"][0],
                                           "redirect_uri": REDIRECT, **web["client"]})
    assert r.status_code == 200, r.text
    assert r.json()["access_token"]


def test_pkce_mismatch_and_missing_verifier(sso: SSO, web: dict[str, Any]) -> None:
    pub = web["public"]
    _, challenge = pkce_pair()
    q = login_and_consent(sso, pub["client_id"], web["user"], scope="user/*.rs", challenge=challenge)
    wrong, _ = pkce_pair()
    body = oauth_error(httpx.post(sso.base + TOKEN, data={
        "grant_type": "authorization_code", "code": q["code"][0], "redirect_uri": REDIRECT,
        "client_id": pub["client_id"], "code_verifier": wrong}), 400, "invalid_grant")
    assert "PKCE" in body["error_description"]
    q = login_and_consent(sso, pub["client_id"], web["user"], scope="user/*.rs", challenge=challenge)
    oauth_error(httpx.post(sso.base + TOKEN, data={
        "grant_type": "authorization_code", "code": q["code"][0], "redirect_uri": REDIRECT,
        "client_id": pub["client_id"]}), 400, "invalid_grant")


def test_code_replay_revokes_tokens(sso: SSO, web: dict[str, Any]) -> None:
    c = web["client"]
    q = login_and_consent(sso, c["client_id"], web["user"], scope="user/*.rs offline_access")
    data = {"grant_type": "authorization_code", "code": q["code"][0], "redirect_uri": REDIRECT, **c}
    first = httpx.post(sso.base + TOKEN, data=data)
    assert first.status_code == 200
    tok = first.json()
    assert httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + tok["access_token"]}
                     ).status_code == 200
    body = oauth_error(httpx.post(sso.base + TOKEN, data=data), 400, "invalid_grant")
    assert "already used" in body["error_description"]
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + tok["access_token"]}))
    oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "refresh_token", "refresh_token": tok["refresh_token"],
                                                   **c}), 400, "invalid_grant")


def test_expired_code(sso: SSO, web: dict[str, Any]) -> None:
    from dhp.auth.core import sha256
    from dhp.store import auth as db
    from dhp.store import now_us

    c = web["client"]
    code = "expired-" + uuid.uuid4().hex
    sso.call(db.insert_code(sso.live.server.store, sha256(code), uuid.uuid4().hex, c["client_id"], REDIRECT,
                            {"scope": ["user/*.rs"], "username": web["user"]}, now_us() - 5_000_000))
    body = oauth_error(httpx.post(sso.base + TOKEN, data={"grant_type": "authorization_code", "code": code,
                                                          "redirect_uri": REDIRECT, **c}), 400, "invalid_grant")
    assert "expired" in body["error_description"]


def test_user_denies_consent(sso: SSO, web: dict[str, Any]) -> None:
    c = web["client"]
    with httpx.Client(base_url=sso.base) as b:
        r = b.get("/oauth/authorize", params={"response_type": "code", "client_id": c["client_id"],
                                              "redirect_uri": REDIRECT, "scope": "user/*.rs", "state": "d"})
        r = b.post("/oauth/authorize", data={"step": "login", "csrf_token": hidden(r.text, "csrf_token"),
                                             "request": hidden(r.text, "request"), "username": web["user"],
                                             "password": PASSWORD})
        r = b.post("/oauth/authorize", data={"step": "consent", "csrf_token": hidden(r.text, "csrf_token"),
                                             "request": hidden(r.text, "request"), "ticket": hidden(r.text, "ticket"),
                                             "decision": "deny"})
    assert r.status_code == 303
    assert parse_qs(urlsplit(r.headers["location"]).query)["error"] == ["access_denied"]


def test_csrf_is_enforced(sso: SSO, web: dict[str, Any]) -> None:
    c = web["client"]
    with httpx.Client(base_url=sso.base) as b:
        r = b.get("/oauth/authorize", params={"response_type": "code", "client_id": c["client_id"],
                                              "redirect_uri": REDIRECT, "scope": "user/*.rs"})
        form = {"step": "login", "csrf_token": hidden(r.text, "csrf_token"), "request": hidden(r.text, "request"),
                "username": web["user"], "password": PASSWORD}
    # A forged cross-site post: no cookie.
    r = httpx.post(sso.base + "/oauth/authorize", data=form)
    assert r.status_code == 403 and "ticket" not in r.text
    # Cookie present but the form token differs.
    r = httpx.post(sso.base + "/oauth/authorize", data={**form, "csrf_token": "forged"},
                   cookies={"dhp_csrf": form["csrf_token"]})
    assert r.status_code == 403


# ---------------------------------------------------------------------------------------------- bearer tokens

def _forge(sso: SSO, **over: Any) -> str:
    now = int(time.time())
    claims = {"iss": sso.base, "aud": sso.fhir, "sub": "x", "client_id": sso.admin["client_id"],
              "scope": "system/*.cruds", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    claims.update(over)
    return str(sso.state.sign(claims, "at+jwt"))


def test_fhir_requires_a_token(sso: SSO) -> None:
    fhir_401(httpx.get(sso.fhir + "/Patient"))
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Basic abc"}))
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer not.a.jwt"}))


def test_forged_by_our_key_is_accepted_as_control(sso: SSO) -> None:
    r = httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + _forge(sso)})
    assert r.status_code == 200, r.text


def test_expired_token(sso: SSO) -> None:
    tok = _forge(sso, iat=int(time.time()) - 7200, exp=int(time.time()) - 10)
    r = httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + tok})
    fhir_401(r)
    assert "expired" in r.json()["issue"][0]["diagnostics"]


def test_tampered_token(sso: SSO) -> None:
    header, payload, sig = sso.admin_token().split(".")
    claims = jwt.decode(sso.admin_token(), sso.state.keyset).claims
    claims["scope"] = "system/*.cruds dhp/admin extra"
    forged_payload = base64.urlsafe_b64encode(__import__("json").dumps(claims).encode()).rstrip(b"=").decode()
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": f"Bearer {header}.{forged_payload}.{sig}"}))
    # Signature bytes flipped.
    bad_sig = ("A" if sig[0] != "A" else "B") + sig[1:]
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": f"Bearer {header}.{payload}.{bad_sig}"}))


def test_foreign_key_and_alg_none(sso: SSO) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "attacker"}, private=True)
    now = int(time.time())
    claims = {"iss": sso.base, "aud": sso.fhir, "sub": "x", "client_id": "dhp-admin", "scope": "system/*.cruds",
              "iat": now, "exp": now + 300, "jti": "j"}
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={
        "Authorization": "Bearer " + jwt.encode({"alg": "RS256", "kid": "attacker"}, claims, key)}))
    none_tok = (base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode() + "."
                + base64.urlsafe_b64encode(__import__("json").dumps(claims).encode()).rstrip(b"=").decode() + ".")
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + none_tok}))


def test_wrong_audience_and_issuer(sso: SSO) -> None:
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={
        "Authorization": "Bearer " + _forge(sso, aud="https://elsewhere.example/fhir")}))
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={
        "Authorization": "Bearer " + _forge(sso, iss="https://elsewhere.example")}))


def test_revoked_token(sso: SSO, cc: dict[str, str]) -> None:
    tok = httpx.post(sso.base + TOKEN, data={"grant_type": "client_credentials", **cc}).json()["access_token"]
    assert httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + tok}).status_code == 200
    assert httpx.post(sso.base + "/oauth/revoke", data={"token": tok, **cc}).status_code == 200
    r = httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + tok})
    fhir_401(r)
    assert "revoked" in r.json()["issue"][0]["diagnostics"]


def test_revocation_reaches_other_processes(sso: SSO, cc: dict[str, str]) -> None:
    """A process that did not revoke learns it from the database within the poll interval."""
    from dhp.auth.core import REVOCATION_POLL, AuthError, AuthState

    tok = httpx.post(sso.base + TOKEN, data={"grant_type": "client_credentials", **cc}).json()["access_token"]
    headers = {"authorization": "Bearer " + tok, "host": sso.base.split("://")[1]}

    async def other_process() -> AuthState:
        st = AuthState(sso.live.server)
        await st.load_keys(create=False)
        await st.sync_revocations(force=True)
        await st.authenticate(headers)
        return st

    st = sso.call(other_process())
    assert httpx.post(sso.base + "/oauth/revoke", data={"token": tok, **cc}).status_code == 200
    time.sleep(REVOCATION_POLL + 0.1)
    with pytest.raises(AuthError):
        sso.call(st.authenticate(headers))


def test_insufficient_scope_is_403(sso: SSO, cc: dict[str, str]) -> None:
    tok = httpx.post(sso.base + TOKEN, data={"grant_type": "client_credentials", **cc}).json()["access_token"]
    h = {"Authorization": "Bearer " + tok, "Content-Type": "application/fhir+json"}
    r = httpx.post(sso.fhir + "/Patient", json={"resourceType": "Patient"}, headers=h)
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert httpx.get(sso.fhir + "/Observation/x", headers=h).status_code == 403


# ---------------------------------------------------------------------------------------------- throttling

def _attempt(sso: SSO, client_id: str, username: str, password: str) -> httpx.Response:
    with httpx.Client(base_url=sso.base) as b:
        r = b.get("/oauth/authorize", params={"response_type": "code", "client_id": client_id,
                                              "redirect_uri": REDIRECT, "scope": "user/*.rs"})
        return b.post("/oauth/authorize", data={"step": "login", "csrf_token": hidden(r.text, "csrf_token"),
                                                "request": hidden(r.text, "request"), "username": username,
                                                "password": password})


def test_failed_logins_are_throttled_per_account(sso: SSO, web: dict[str, Any]) -> None:
    from dhp.auth.endpoints import ACCOUNT_LIMIT

    user = sso.create_user(fhir_user="Practitioner/t")
    cid = web["client"]["client_id"]
    for _ in range(ACCOUNT_LIMIT):
        r = _attempt(sso, cid, user, "wrong password")
        assert r.status_code == 401 and 'role="alert"' in r.text
    # Locked now: even the right password is refused, with the throttling message.
    r = _attempt(sso, cid, user, PASSWORD)
    assert r.status_code == 429 and "ticket" not in r.text
    # Another account from the same address still works (the address limit is higher).
    other = sso.create_user(fhir_user="Practitioner/t2")
    assert _attempt(sso, cid, other, PASSWORD).status_code == 200
    # The state is in the database: a fresh look at the table shows the lock.
    from dhp.store import auth as db

    state = sso.call(db.throttle_state(sso.live.server.store, [f"user:{user}"]))
    assert state[f"user:{user}"][0] >= ACCOUNT_LIMIT


def test_sign_in_with_an_overlong_username_is_a_failed_sign_in(any_sso: SSO) -> None:
    # No account has a name this long (at most 200 characters); the failure is counted, never a 5xx.
    c = any_sso.create_client("user/*.rs", redirect_uris=[REDIRECT])
    r = _attempt(any_sso, c["client_id"], "u" * 300, "x" * 10)
    assert r.status_code == 401 and 'role="alert"' in r.text, r.text[:300]


def test_failed_logins_are_throttled_per_address(sso: SSO, web: dict[str, Any]) -> None:
    from dhp.auth.endpoints import ADDRESS_LIMIT
    from dhp.store import auth as db

    cid = web["client"]["client_id"]
    # Pretend this address already failed just short of the limit (in the shared table).
    sso.call(db.throttle_fail(sso.live.server.store, {"addr:127.0.0.1": ADDRESS_LIMIT}, 900_000_000, 60_000_000))
    for _ in range(ADDRESS_LIMIT):
        r = _attempt(sso, cid, "nobody-" + uuid.uuid4().hex[:6], "x" * 10)
        if r.status_code == 429:
            break
    assert r.status_code == 429
    user = sso.create_user()
    assert _attempt(sso, cid, user, PASSWORD).status_code == 429
    sso.call(db.throttle_clear(sso.live.server.store, "addr:127.0.0.1"))
    assert _attempt(sso, cid, user, PASSWORD).status_code == 200


def test_other_server_jws_are_not_access_tokens(sso: SSO, web: dict[str, Any]) -> None:
    """The sign-in page's signed request (it carries client_id and exp) is not a bearer token."""
    c = web["client"]
    r = httpx.get(sso.base + "/oauth/authorize", params={"response_type": "code", "client_id": c["client_id"],
                                                         "redirect_uri": REDIRECT, "scope": "user/*.rs"})
    req = hidden(r.text, "request")
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + req}))
    assert httpx.post(sso.base + "/oauth/introspect", data={"token": req, **sso.admin}).json() == {"active": False}


def test_concurrent_code_exchange_has_one_winner(any_sso: SSO) -> None:
    """Two exchanges of one code racing: exactly one gets tokens, and the replay revokes them."""
    from concurrent.futures import ThreadPoolExecutor

    sso = any_sso
    user = sso.create_user(fhir_user="Practitioner/race")
    c = sso.create_client("user/*.rs", redirect_uris=[REDIRECT])
    q = login_and_consent(sso, c["client_id"], user, scope="user/*.rs")
    data = {"grant_type": "authorization_code", "code": q["code"][0], "redirect_uri": REDIRECT, **c}
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda _: httpx.post(sso.base + TOKEN, data=data), range(4)))
    ok = [r for r in rs if r.status_code == 200]
    assert len(ok) == 1, [r.status_code for r in rs]
    assert all(r.json()["error"] == "invalid_grant" for r in rs if r.status_code != 200)
    fhir_401(httpx.get(sso.fhir + "/Patient", headers={"Authorization": "Bearer " + ok[0].json()["access_token"]}))
