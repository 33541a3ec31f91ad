"""Document life cycle: preliminary → final → amended, or entered-in-error; each version a new Bundle."""

from __future__ import annotations

from typing import Any

import httpx

from tests.documents import fixtures as fx
from tests.documents.helpers import post, search


def version_of(prev: dict[str, Any], status: str, target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The next version: same Composition.identifier and fullUrls, new Bundle.identifier, relatesTo replaces."""
    b = fx.clone(prev)
    b["identifier"] = {**b["identifier"], "value": b["identifier"]["value"] + "-" + status}
    comp = b["entry"][0]["resource"]
    comp["status"] = status
    comp["relatesTo"] = [{"type": "replaces", "resourceReference": target or {"identifier": prev["identifier"]}}]
    return b


def docref(client: httpx.Client, bundle: dict[str, Any]) -> dict[str, Any]:
    found = search(client, "/DocumentReference", identifier=f"{bundle['identifier']['system']}|"
                                                            f"{bundle['identifier']['value']}")
    assert len(found) == 1
    return found[0]


def test_preliminary_final_amended(client: httpx.Client) -> None:
    v1 = fx.form_096(status="preliminary")
    del v1["entry"][0]["resource"]["attester"]  # a preliminary record need not be attested yet
    r1 = post(client, v1)
    assert r1.status_code == 201, r1.text
    b1 = r1.json()["id"]
    # The same Composition.identifier again, without saying it replaces v1: refused.
    clash = fx.clone(v1)
    clash["identifier"]["value"] += "-x"
    r = post(client, clash)
    assert r.status_code == 409 and "relatesTo" in r.json()["issue"][0]["diagnostics"]
    v2 = version_of(v1, "final", {"reference": f"Bundle/{b1}"})
    v2["entry"][0]["resource"]["attester"] = fx.form_096()["entry"][0]["resource"]["attester"]
    v2["entry"][0]["resource"]["attester"][0]["party"] = v2["entry"][0]["resource"]["author"][0]
    weight = v2["entry"][7]["resource"]["valueQuantity"]
    weight["value"] = fx.Decimal("2.480")  # corrected on the final version
    r2 = post(client, v2)
    assert r2.status_code == 201, r2.text
    b2 = r2.json()["id"]
    d1, d2 = docref(client, v1), docref(client, v2)
    assert d1["status"] == "superseded" and d2["status"] == "current"
    assert d2["relatesTo"][0]["target"]["reference"] == f"DocumentReference/{d1['id']}"
    assert d2["relatesTo"][0]["code"]["coding"][0]["code"] == "replaces"
    # The earlier Bundle is unchanged; the split Observation was updated in place, not duplicated.
    assert client.get(f"/Bundle/{b1}").json()["meta"]["versionId"] == "1"
    baby = d2["subject"]["reference"]
    assert d1["subject"]["reference"] == baby
    weights = search(client, "/Observation", subject=baby, code="8339-4")
    assert len(weights) == 1 and str(weights[0]["valueQuantity"]["value"]) == "2.48"
    assert weights[0]["meta"]["versionId"] == "2"
    # Replacing the superseded v1 again is a conflict; final → preliminary is not a life-cycle step.
    again = version_of(v1, "final", {"reference": f"Bundle/{b1}"})
    again["identifier"]["value"] += "-again"
    again["entry"][0]["resource"]["attester"] = v2["entry"][0]["resource"]["attester"]
    r = post(client, again)
    assert r.status_code == 409
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "document-superseded"
    back = version_of(v2, "preliminary", {"reference": f"Bundle/{b2}"})
    r = post(client, back)
    assert r.status_code == 409
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "document-transition"
    v3 = version_of(v2, "amended", {"reference": f"Composition/{_composition_id(client, v2)}"})
    r3 = post(client, v3)
    assert r3.status_code == 201, r3.text
    assert docref(client, v2)["status"] == "superseded"
    assert docref(client, v3)["docStatus"] == "amended"
    current = search(client, "/DocumentReference", patient=baby, status="current")
    assert [d["id"] for d in current] == [docref(client, v3)["id"]]


def _composition_id(client: httpx.Client, bundle: dict[str, Any]) -> str:
    ident = bundle["entry"][0]["resource"]["identifier"][0]
    comps = search(client, "/Composition", identifier=f"{ident['system']}|{ident['value']}")
    assert len(comps) == 1
    return str(comps[0]["id"])


def test_entered_in_error_retires_and_ends_the_chain(client: httpx.Client) -> None:
    v1 = fx.form_003()
    assert post(client, v1).status_code == 201
    d1 = docref(client, v1)
    patient = d1["subject"]["reference"]
    v2 = version_of(v1, "entered-in-error")
    r = post(client, v2)
    assert r.status_code == 201, r.text
    d1, d2 = docref(client, v1), docref(client, v2)
    assert d1["status"] == "superseded" and d2["status"] == "entered-in-error"
    # Records are retired by a status change, never erased.
    procs = search(client, "/Procedure", subject=patient)
    assert len(procs) == 1 and procs[0]["status"] == "entered-in-error"
    conds = search(client, "/Condition", subject=patient)
    assert {c["verificationStatus"]["coding"][0]["code"] for c in conds} == {"entered-in-error"}
    v3 = version_of(v2, "final")
    r = post(client, v3)
    assert r.status_code == 409


def test_first_version_cannot_be_amended(client: httpx.Client) -> None:
    b = fx.form_096(status="amended")
    r = post(client, b)
    assert r.status_code == 422
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "document-replaces-missing"
    b = fx.form_096()
    b["entry"][0]["resource"]["relatesTo"] = [{"type": "replaces", "resourceReference": {"reference": "Bundle/nope"}}]
    r = post(client, b)
    assert r.status_code == 422
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "document-replaces-unknown"
