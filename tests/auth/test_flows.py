"""OAuth 2.0 / OpenID Connect flows end to end over real HTTP, with httpx, Authlib's OAuth2 client and the
SMART client ``fhirclient``: client credentials, authorization code with and without PKCE, refresh
(rotation + reuse detection), revoke, introspect, userinfo, discovery, JWKS, key rotation, audit events."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from joserfc import jws, jwt
from joserfc.jwk import KeySet

from tests.auth.conftest import PASSWORD, REDIRECT, SSO, hidden, login_and_consent, pkce_pair

FJ = {"Accept": "application/fhir+json", "Content-Type": "application/fhir+json"}


def jwks(sso: SSO) -> KeySet:
    return KeySet.import_key_set(httpx.get(sso.base + "/oauth/jwks").json())


def verify(sso: SSO, token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, jwks(sso), algorithms=["RS256", "ES256"]).claims)


def kid_of(token: str) -> str:
    return str(jws.extract_compact(token.encode()).headers()["kid"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **FJ}


# ---------------------------------------------------------------------------------------------- discovery

def test_discovery_documents(sso: SSO) -> None:
    oidc = httpx.get(sso.base + "/.well-known/openid-configuration").json()
    assert oidc["issuer"] == sso.base
    assert oidc["token_endpoint"] == sso.base + "/oauth/token"
    assert oidc["code_challenge_methods_supported"] == ["S256"]
    for path in ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"):
        r = httpx.get(sso.base + path)  # public: no token
        assert r.status_code == 200
        smart = r.json()
        assert smart["authorization_endpoint"] == sso.base + "/oauth/authorize"
        assert "permission-v2" in smart["capabilities"]
        assert set(smart["grant_types_supported"]) == {"authorization_code", "client_credentials", "refresh_token"}
    keys = httpx.get(oidc["jwks_uri"]).json()["keys"]
    assert keys and all("d" not in k and k["kid"] for k in keys)


def test_metadata_is_public_and_declares_smart(sso: SSO) -> None:
    r = httpx.get(sso.fhir + "/metadata", headers={"Accept": "application/fhir+json"})
    assert r.status_code == 200, r.text
    sec = r.json()["rest"][0]["security"]
    assert sec["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = {e["url"]: e["valueUri"] for e in sec["extension"][0]["extension"]}
    assert uris["token"] == sso.base + "/oauth/token"
    assert uris["authorize"] == sso.base + "/oauth/authorize"


# ---------------------------------------------------------------------------------------------- client credentials

def test_client_credentials_form_and_basic(any_sso: SSO) -> None:
    sso = any_sso
    c = sso.create_client("system/Patient.cruds system/Observation.rs")
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert r.headers["cache-control"] == "no-store"
    claims = verify(sso, body["access_token"])
    assert claims["iss"] == sso.base and claims["aud"] == sso.fhir
    assert claims["client_id"] == c["client_id"] == claims["sub"]
    assert claims["scope"] == "system/Patient.cruds system/Observation.rs"
    assert claims["exp"] - claims["iat"] == 3600 and claims["jti"]
    # HTTP Basic, with a narrower scope.
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", "scope": "system/Patient.r"},
                   auth=(c["client_id"], c["client_secret"]))
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == "system/Patient.r"
    # The token works on the FHIR API.
    tok = body["access_token"]
    p = httpx.post(sso.fhir + "/Patient", json={"resourceType": "Patient", "active": True}, headers=bearer(tok))
    assert p.status_code == 201, p.text
    assert httpx.get(f"{sso.fhir}/Patient/{p.json()['id']}", headers=bearer(tok)).status_code == 200


def test_client_credentials_with_authlib(sso: SSO) -> None:
    c = sso.create_client("system/*.rs")
    for method in ("client_secret_basic", "client_secret_post"):
        with OAuth2Client(c["client_id"], c["client_secret"], token_endpoint_auth_method=method,
                          scope="system/Patient.rs") as oc:
            tok = oc.fetch_token(sso.base + "/oauth/token", grant_type="client_credentials")
            assert tok["token_type"] == "Bearer" and tok["scope"] == "system/Patient.rs"
            r = oc.get(sso.fhir + "/Patient", headers={"Accept": "application/fhir+json"})
            assert r.status_code == 200, r.text
            assert r.json()["resourceType"] == "Bundle"


def test_fhirclient_client_credentials(sso: SSO) -> None:
    from fhirclient import client as fc

    c = sso.create_client("system/*.rs")
    pid = sso.put({"resourceType": "Patient", "active": True, "gender": "female"})["id"]
    smart = fc.FHIRClient(settings={"app_id": c["client_id"], "app_secret": c["client_secret"],
                                    "api_base": sso.fhir + "/", "scope": "system/*.rs"})
    smart.prepare()
    smart.authorize()
    assert smart.ready
    got = smart.server.request_json(f"Patient/{pid}")
    assert got["id"] == pid and got["gender"] == "female"


# ---------------------------------------------------------------------------------------------- authorization code

def test_authorization_code_with_pkce_authlib_public_client(any_sso: SSO) -> None:
    sso = any_sso
    pat = sso.put({"resourceType": "Patient", "active": True})["id"]
    user = sso.create_user(fhir_user=f"Patient/{pat}", name="Dilnoza")
    c = sso.create_client("patient/*.rs launch/patient openid fhirUser offline_access", public=True,
                          redirect_uris=[REDIRECT])
    verifier, challenge = pkce_pair()
    oc = OAuth2Client(c["client_id"], redirect_uri=REDIRECT, scope="patient/*.rs openid fhirUser offline_access",
                      code_challenge_method="S256", token_endpoint_auth_method="none")
    url, state = oc.create_authorization_url(sso.base + "/oauth/authorize", code_verifier=verifier)
    assert "code_challenge=" + challenge in url
    with httpx.Client(follow_redirects=False) as browser:
        r = browser.get(url)
        assert r.status_code == 200 and 'name="username"' in r.text and 'name="password"' in r.text
        r = browser.post(sso.base + "/oauth/authorize", data={
            "step": "login", "csrf_token": hidden(r.text, "csrf_token"), "request": hidden(r.text, "request"),
            "username": user, "password": PASSWORD})
        assert r.status_code == 200, r.text
        r = browser.post(sso.base + "/oauth/authorize", data={
            "step": "consent", "csrf_token": hidden(r.text, "csrf_token"), "request": hidden(r.text, "request"),
            "ticket": hidden(r.text, "ticket"), "decision": "allow"})
        assert r.status_code == 303
        callback = r.headers["location"]
    q = parse_qs(urlsplit(callback).query)
    assert q["state"] == [state] and q["iss"] == [sso.base]
    tok = oc.fetch_token(sso.base + "/oauth/token", authorization_response=callback, code_verifier=verifier)
    assert tok["patient"] == pat and tok["refresh_token"] and tok["id_token"]
    claims = verify(sso, tok["access_token"])
    assert claims["sub"] == user and claims["fhirUser"] == f"Patient/{pat}" and claims["patient"] == pat
    idt = verify(sso, tok["id_token"])
    assert idt["aud"] == c["client_id"] and idt["fhirUser"] == f"Patient/{pat}" and idt["iss"] == sso.base
    # The patient token reads its own record and nobody else's.
    other = sso.put({"resourceType": "Patient", "active": True})["id"]
    assert httpx.get(f"{sso.fhir}/Patient/{pat}", headers=bearer(tok["access_token"])).status_code == 200
    assert httpx.get(f"{sso.fhir}/Patient/{other}", headers=bearer(tok["access_token"])).status_code == 403


def test_authorization_code_confidential_without_pkce_and_openid(sso: SSO) -> None:
    prac = sso.put({"resourceType": "Practitioner", "active": True})["id"]
    user = sso.create_user(fhir_user=f"Practitioner/{prac}", name="Dr. Aziz Karimov")
    c = sso.create_client("user/*.cruds openid fhirUser profile", redirect_uris=[REDIRECT, REDIRECT + "2"])
    q = login_and_consent(sso, c["client_id"], user, scope="user/Patient.rs openid fhirUser profile",
                          nonce="n-123")
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "authorization_code", "code": q["code"][0],
                                                    "redirect_uri": REDIRECT}, auth=(c["client_id"], c["client_secret"]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "refresh_token" not in body  # neither offline_access nor online_access was asked for
    idt = verify(sso, body["id_token"])
    assert idt["nonce"] == "n-123" and idt["name"] == "Dr. Aziz Karimov" and idt["sub"] == user
    ui = httpx.get(sso.base + "/oauth/userinfo", headers={"Authorization": "Bearer " + body["access_token"]})
    assert ui.status_code == 200
    assert ui.json() == {"sub": user, "fhirUser": f"Practitioner/{prac}", "preferred_username": user,
                         "name": "Dr. Aziz Karimov"}
    at = body["access_token"]
    assert httpx.get(sso.fhir + "/Patient", headers=bearer(at)).status_code == 200
    assert httpx.get(sso.fhir + "/Observation/x", headers=bearer(at)).status_code == 403
    assert httpx.post(sso.fhir + "/Patient", json={"resourceType": "Patient"}, headers=bearer(at)).status_code == 403


def test_fhirclient_authorization_code(sso: SSO) -> None:
    from fhirclient import client as fc

    pat = sso.put({"resourceType": "Patient", "active": True})["id"]
    user = sso.create_user(fhir_user=f"Patient/{pat}")
    c = sso.create_client("patient/*.rs launch/patient openid fhirUser", redirect_uris=[REDIRECT])
    smart = fc.FHIRClient(settings={"app_id": c["client_id"], "app_secret": c["client_secret"],
                                    "api_base": sso.fhir + "/", "redirect_uri": REDIRECT,
                                    "scope": "patient/*.rs openid fhirUser"})
    url = smart.authorize_url
    assert url.startswith(sso.base + "/oauth/authorize")
    with httpx.Client(follow_redirects=False) as browser:
        r = browser.get(url)
        r = browser.post(sso.base + "/oauth/authorize", data={
            "step": "login", "csrf_token": hidden(r.text, "csrf_token"), "request": hidden(r.text, "request"),
            "username": user, "password": PASSWORD})
        r = browser.post(sso.base + "/oauth/authorize", data={
            "step": "consent", "csrf_token": hidden(r.text, "csrf_token"), "request": hidden(r.text, "request"),
            "ticket": hidden(r.text, "ticket"), "decision": "allow"})
        assert r.status_code == 303, r.text
    smart.handle_callback(r.headers["location"])
    assert smart.ready and smart.patient_id == pat
    assert smart.server.request_json(f"Patient/{pat}")["id"] == pat


def test_practitioner_picks_patient_for_launch_patient(sso: SSO) -> None:
    pat = sso.put({"resourceType": "Patient", "active": True})["id"]
    user = sso.create_user(fhir_user="Practitioner/p-unknown")
    c = sso.create_client("patient/*.rs launch/patient", redirect_uris=[REDIRECT])
    q = login_and_consent(sso, c["client_id"], user, scope="launch/patient patient/Observation.rs", patient=pat)
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "authorization_code", "code": q["code"][0],
                                                    "redirect_uri": REDIRECT, **c})
    assert r.status_code == 200, r.text
    assert r.json()["patient"] == pat and r.json()["scope"] == "launch/patient patient/Observation.rs"


# ---------------------------------------------------------------------------------------------- refresh

def _code_tokens(sso: SSO, scope: str = "user/*.rs offline_access") -> tuple[dict[str, str], dict[str, Any]]:
    user = sso.create_user(fhir_user="Practitioner/x")
    c = sso.create_client("user/*.rs offline_access", redirect_uris=[REDIRECT])
    q = login_and_consent(sso, c["client_id"], user, scope=scope)
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "authorization_code", "code": q["code"][0],
                                                    "redirect_uri": REDIRECT, **c})
    assert r.status_code == 200, r.text
    return c, r.json()


def test_refresh_rotates_and_reuse_revokes_the_family(any_sso: SSO) -> None:
    sso = any_sso
    c, first = _code_tokens(sso)
    with OAuth2Client(c["client_id"], c["client_secret"], token=first) as oc:
        second = oc.refresh_token(sso.base + "/oauth/token", refresh_token=first["refresh_token"])
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert httpx.get(sso.fhir + "/Patient", headers=bearer(second["access_token"])).status_code == 200
    # Narrowing the scope on refresh is allowed; widening is not.
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "refresh_token", "scope": "user/*.cruds",
                                                    "refresh_token": second["refresh_token"], **c})
    assert r.status_code == 400 and r.json()["error"] == "invalid_scope"
    # Reuse of the rotated-out token: invalid_grant, and the whole family dies.
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "refresh_token",
                                                    "refresh_token": first["refresh_token"], **c})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    assert "reuse" in r.json()["error_description"] or "already used" in r.json()["error_description"]
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "refresh_token",
                                                    "refresh_token": second["refresh_token"], **c})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"
    for tok in (first["access_token"], second["access_token"]):
        r = httpx.get(sso.fhir + "/Patient", headers=bearer(tok))
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]


# ---------------------------------------------------------------------------------------------- revoke / introspect

def test_revoke_and_introspect(any_sso: SSO) -> None:
    sso = any_sso
    c, tok = _code_tokens(sso)
    intro = httpx.post(sso.base + "/oauth/introspect", data={"token": tok["access_token"]},
                       auth=(c["client_id"], c["client_secret"]))
    assert intro.status_code == 200
    info = intro.json()
    assert info["active"] is True and info["client_id"] == c["client_id"] and info["scope"] == "user/*.rs offline_access"
    ri = httpx.post(sso.base + "/oauth/introspect", data={"token": tok["refresh_token"],
                                                          "token_type_hint": "refresh_token"}, auth=(c["client_id"], c["client_secret"]))
    assert ri.json()["active"] is True and ri.json()["token_type"] == "refresh_token"
    # Another (non-admin) client learns nothing about this token; the admin client does.
    other = sso.create_client("system/*.rs")
    assert httpx.post(sso.base + "/oauth/introspect", data={"token": tok["access_token"], **other}).json() == {
        "active": False}
    assert httpx.post(sso.base + "/oauth/introspect", data={"token": tok["access_token"], **sso.admin}).json()[
        "active"] is True
    # Revoke the access token (RFC 7009): 200, then 401 on the API and inactive on introspection.
    r = httpx.post(sso.base + "/oauth/revoke", data={"token": tok["access_token"], "token_type_hint": "access_token"},
                   auth=(c["client_id"], c["client_secret"]))
    assert r.status_code == 200
    assert httpx.get(sso.fhir + "/Patient", headers=bearer(tok["access_token"])).status_code == 401
    assert httpx.post(sso.base + "/oauth/introspect", data={"token": tok["access_token"], **c}).json() == {
        "active": False}
    # Revoking the refresh token kills its family.
    assert httpx.post(sso.base + "/oauth/revoke", data={"token": tok["refresh_token"], **c}).status_code == 200
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "refresh_token",
                                                    "refresh_token": tok["refresh_token"], **c})
    assert r.json()["error"] == "invalid_grant"
    # Unknown tokens: still 200 (RFC 7009 §2.2); garbage introspects as inactive.
    assert httpx.post(sso.base + "/oauth/revoke", data={"token": "nonsense", **c}).status_code == 200
    assert httpx.post(sso.base + "/oauth/introspect", data={"token": "nonsense", **c}).json() == {"active": False}


def test_introspect_needs_client_authentication(sso: SSO) -> None:
    r = httpx.post(sso.base + "/oauth/introspect", data={"token": "x"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    assert r.headers["www-authenticate"].startswith("Basic")


def test_userinfo_errors(sso: SSO) -> None:
    r = httpx.get(sso.base + "/oauth/userinfo")
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    r = httpx.get(sso.base + "/oauth/userinfo", headers={"Authorization": "Bearer " + sso.admin_token()})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"


# ---------------------------------------------------------------------------------------------- keys, audit, admin

def test_key_rotation_keeps_old_tokens_valid(sso: SSO) -> None:
    c = sso.create_client("system/*.rs")
    old = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c}).json()["access_token"]
    old_kid = kid_of(old)
    r = httpx.post(sso.base + "/admin/keys/rotate", headers={"Authorization": "Bearer " + sso.admin_token()})
    assert r.status_code == 200, r.text
    new_kid = r.json()["kid"]
    kids = {k["kid"] for k in httpx.get(sso.base + "/oauth/jwks").json()["keys"]}
    assert {old_kid, new_kid} <= kids
    new = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c}).json()["access_token"]
    assert kid_of(new) == new_kid
    for tok in (old, new):
        assert httpx.get(sso.fhir + "/Patient", headers=bearer(tok)).status_code == 200


def test_keys_are_shared_through_the_database(sso: SSO) -> None:
    """A second process state loading from the same DB verifies tokens the first one signed."""
    from dhp.auth.core import AuthState

    c = sso.create_client("system/*.rs")
    tok = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c}).json()["access_token"]

    async def fresh_verify() -> Any:
        st = AuthState(sso.live.server)
        await st.load_keys(create=False)
        # A plain dict in HTTP's usual casing works as well as Starlette's headers.
        return await st.authenticate({"Authorization": "Bearer " + tok, "Host": sso.base.split("://")[1]})

    p = sso.call(fresh_verify())
    assert p.client_id == c["client_id"] and p.can("r", "Patient") and not p.can("c", "Patient")


def test_unknown_key_ids_reload_keys_at_most_once_a_second(sso: SSO) -> None:
    """A token naming a key this process does not hold reloads the keys (another process may have rotated
    them), but tokens with made-up key ids cannot make every request a database query."""
    import base64
    import json as _json

    from dhp.auth.core import AuthError, AuthState

    c = sso.create_client("system/*.rs")
    host = sso.base.split("://")[1]

    def forged(kid: str) -> str:
        def seg(d: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(_json.dumps(d).encode()).rstrip(b"=").decode()
        return f"{seg({'alg': 'RS256', 'typ': 'at+jwt', 'kid': kid})}.{seg({'client_id': 'x'})}.c2ln"

    async def made_up() -> tuple[AuthState, list[float]]:
        st = AuthState(sso.live.server)
        await st.load_keys(create=False)
        loads: list[float] = []
        st.keys_loaded_at -= 5  # the last load was a while ago
        for i in range(3):
            with pytest.raises(AuthError):
                await st.authenticate({"Authorization": "Bearer " + forged(f"made-up-{i}"), "Host": host})
            loads.append(st.keys_loaded_at)
        st.keys_loaded_at -= 5
        return st, loads

    st, loads = sso.call(made_up())
    # A real rotation elsewhere: the first token signed with the new key is verified after one reload.
    r = httpx.post(sso.base + "/admin/keys/rotate", headers={"Authorization": "Bearer " + sso.admin_token()})
    assert r.status_code == 200, r.text
    tok = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c}).json()
    p = sso.call(st.authenticate({"Authorization": "Bearer " + tok["access_token"], "Host": host}))
    assert loads[0] == loads[1] == loads[2]  # one reload for the first made-up kid, none for the next two
    assert p.client_id == c["client_id"]


def test_audit_events_for_logins_and_tokens(sso: SSO) -> None:
    c = sso.create_client("system/*.rs", name="audited client " + uuid.uuid4().hex[:6])
    assert httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c}).status_code == 200
    bad = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials",
                                                      "client_id": c["client_id"], "client_secret": "wrong"})
    assert bad.status_code == 401

    async def events() -> list[dict[str, Any]]:
        from dhp import fhirjson

        recs = await sso.live.server.store.list_current("AuditEvent")
        return [fhirjson.loads(r.content) for r in recs]

    evs = [e for e in sso.call(events()) if any(a["who"].get("identifier", {}).get("value") == c["client_id"]
                                                for a in e["agent"])]
    outcomes = sorted(e["outcome"]["code"]["code"] for e in evs)
    assert outcomes == ["error", "success"]
    for e in evs:
        assert e["meta"]["profile"] == ["https://dhp.uz/fhir/core/StructureDefinition/uz-core-auditevent"]
        assert e["meta"]["versionId"] == "1" and e["id"] and e["meta"]["lastUpdated"]
        assert e["category"][0]["coding"][0]["code"] == "110114"
        assert e["code"]["coding"][0]["code"] == "110122"
    # The events are ordinary resources: readable through the FHIR API with history.
    ev = evs[0]
    r = httpx.get(f"{sso.fhir}/AuditEvent/{ev['id']}/_history/1", headers=bearer(sso.admin_token()))
    assert r.status_code == 200 and r.json()["id"] == ev["id"]


def test_admin_api_needs_dhp_admin(sso: SSO) -> None:
    c = sso.create_client("system/*.cruds")
    tok = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c}).json()["access_token"]
    r = httpx.get(sso.base + "/admin/clients", headers={"Authorization": "Bearer " + tok})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
    assert httpx.get(sso.base + "/admin/clients").status_code == 401
    admin = {"Authorization": "Bearer " + sso.admin_token()}
    listed = httpx.get(sso.base + "/admin/clients", headers=admin).json()
    assert any(x["client_id"] == c["client_id"] and "client_secret" not in x for x in listed)
    r = httpx.post(sso.base + "/admin/clients", json={"name": "x", "scopes": "user/*.bogus"}, headers=admin)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    # Revoking a client kills its live tokens and its credentials.
    assert httpx.delete(f"{sso.base}/admin/clients/{c['client_id']}", headers=admin).status_code == 204
    assert httpx.get(sso.fhir + "/Patient", headers=bearer(tok)).status_code == 401
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **c})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    # Secret rotation: the old secret stops working, the new one works.
    d = sso.create_client("system/*.rs")
    r = httpx.post(f"{sso.base}/admin/clients/{d['client_id']}/rotate-secret", headers=admin)
    new_secret = r.json()["client_secret"]
    assert httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", **d}).status_code == 401
    assert httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials", "client_id": d["client_id"],
                                                       "client_secret": new_secret}).status_code == 200


def test_disabled_user_tokens_die(sso: SSO) -> None:
    user = sso.create_user(fhir_user="Practitioner/x")
    c = sso.create_client("user/*.rs offline_access", redirect_uris=[REDIRECT])
    q = login_and_consent(sso, c["client_id"], user, scope="user/*.rs offline_access")
    tok = httpx.post(sso.base + "/oauth/token", data={"grant_type": "authorization_code", "code": q["code"][0],
                                                      "redirect_uri": REDIRECT, **c}).json()
    assert httpx.get(sso.fhir + "/Patient", headers=bearer(tok["access_token"])).status_code == 200
    r = httpx.post(f"{sso.base}/admin/users/{user}/disable", headers={"Authorization": "Bearer " + sso.admin_token()})
    assert r.status_code == 204
    assert httpx.get(sso.fhir + "/Patient", headers=bearer(tok["access_token"])).status_code == 401
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "refresh_token",
                                                    "refresh_token": tok["refresh_token"], **c})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("lang,word", [("uz", "Kirish"), ("ru", "Войти"), ("en", "Sign in")])
def test_login_page_languages(sso: SSO, lang: str, word: str) -> None:
    c = sso.create_client("user/*.rs", redirect_uris=[REDIRECT])
    r = httpx.get(sso.base + "/oauth/authorize", params={"response_type": "code", "client_id": c["client_id"],
                                                         "redirect_uri": REDIRECT, "scope": "user/*.rs",
                                                         "ui_locales": lang})
    assert r.status_code == 200
    assert f'<html lang="{lang}">' in r.text and word in r.text
    assert '<label for="username">' in r.text and '<label for="password">' in r.text
    assert "dhp_csrf=" in r.headers["set-cookie"] and "samesite=strict" in r.headers["set-cookie"].lower()
    # Accept-Language picks the language when ui_locales is absent.
    r = httpx.get(sso.base + "/oauth/authorize", params={"response_type": "code", "client_id": c["client_id"],
                                                         "redirect_uri": REDIRECT, "scope": "user/*.rs"},
                  headers={"Accept-Language": f"{lang};q=0.9, de;q=0.8"})
    assert f'<html lang="{lang}">' in r.text


def test_es256_tokens(sso: SSO) -> None:
    """DHP_TOKEN_ALG=ES256: a process signing with P-256 keys; the key lands in the shared JWKS."""
    from types import SimpleNamespace

    from dhp.auth.core import AuthState
    from dhp.settings import Settings

    host = sso.base.split("://")[1]

    async def es256() -> tuple[str, Any]:
        server = SimpleNamespace(settings=Settings(token_alg="ES256"), store=sso.live.server.store)
        st = AuthState(server)
        await st.load_keys()
        tok, _ = await st.issue_access_token(headers={"host": host}, client_id="c", sub="c", scope=["system/*.rs"],
                                       fhir_user=None, patient=None, grant_id=None)
        return tok, await st.authenticate({"authorization": "Bearer " + tok, "host": host})

    tok, principal = sso.call(es256())
    assert jws.extract_compact(tok.encode()).headers()["alg"] == "ES256"
    assert principal.can("s", "Patient")
    # The API process finds the new key in the database when it meets an unknown kid.
    assert httpx.get(sso.fhir + "/Patient", headers=bearer(tok)).status_code == 200
    assert any(k["kty"] == "EC" for k in httpx.get(sso.base + "/oauth/jwks").json()["keys"])


def test_audit_events_are_searchable(sso: SSO) -> None:
    c = sso.create_client("system/*.rs")
    r = httpx.post(sso.base + "/oauth/token", data={"grant_type": "client_credentials",
                                                    "client_id": c["client_id"], "client_secret": "wrong"})
    assert r.status_code == 401
    sso.call(sso.state.audit.wait_indexed())

    async def latest_error() -> str:
        from dhp import fhirjson

        for rec in await sso.live.server.store.list_current("AuditEvent"):
            ev = fhirjson.loads(rec.content)
            if any(a["who"].get("identifier", {}).get("value") == c["client_id"] for a in ev["agent"]):
                return str(ev["id"])
        raise AssertionError("no event")

    eid = sso.call(latest_error())
    h = bearer(sso.admin_token())
    hit = httpx.get(sso.fhir + "/AuditEvent", params={"_id": eid, "outcome": "error"}, headers=h)
    assert hit.status_code == 200, hit.text
    assert [e["resource"]["id"] for e in hit.json().get("entry", [])] == [eid]
    miss = httpx.get(sso.fhir + "/AuditEvent", params={"_id": eid, "outcome": "success"}, headers=h)
    assert miss.json().get("entry", []) == []


def test_admin_client_is_created_once(sso: SSO) -> None:
    import dhp.auth as auth

    assert sso.admin["client_id"] == auth.ADMIN_CLIENT_ID
    assert sso.call(auth.ensure_admin_client(sso.live.server)) is None  # it exists: nothing printed again
    tok = sso.admin_token()
    claims = verify(sso, tok)
    assert set(claims["scope"].split()) == {"system/*.cruds", "dhp/admin"}


def test_public_client_refresh_and_rotated_token_is_inactive(sso: SSO) -> None:
    user = sso.create_user(fhir_user="Practitioner/pub")
    c = sso.create_client("user/*.rs offline_access", public=True, redirect_uris=[REDIRECT])
    verifier, challenge = pkce_pair()
    q = login_and_consent(sso, c["client_id"], user, scope="user/*.rs offline_access", challenge=challenge)
    first = httpx.post(sso.base + "/oauth/token", data={
        "grant_type": "authorization_code", "code": q["code"][0], "redirect_uri": REDIRECT,
        "client_id": c["client_id"], "code_verifier": verifier}).json()
    second = httpx.post(sso.base + "/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": c["client_id"]})
    assert second.status_code == 200, second.text
    intro = httpx.post(sso.base + "/oauth/introspect", data={"token": first["refresh_token"], **sso.admin})
    assert intro.json() == {"active": False}
    intro = httpx.post(sso.base + "/oauth/introspect", data={"token": second.json()["refresh_token"], **sso.admin})
    assert intro.json()["active"] is True and intro.json()["sub"] == user
