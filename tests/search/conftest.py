"""A DHP server per backend loaded with a small, hand-checked data set for search tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer

PINFL = "https://dpm.uz/identifier/national-unique-id"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SNOMED = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MAHALLA = "https://terminology.dhp.uz/fhir/core/CodeSystem/mahalla-cs"


def _obs(oid: str, patient: str, code: str, display: str, when: Any, value: dict[str, Any] | None = None,
         status: str = "final", **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": status,
                         "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                         "subject": {"reference": f"Patient/{patient}"}}
    if isinstance(when, dict):
        r["effectivePeriod"] = when
    elif when:
        r["effectiveDateTime"] = when
    if value:
        r.update(value)
    r.update(extra)
    return r


def dataset() -> list[dict[str, Any]]:
    return [
        {"resourceType": "Organization", "id": "org1", "name": "Toshkent shahar 1-son oilaviy poliklinika",
         "identifier": [{"system": "https://soliq.uz", "value": "200100100"}]},
        {"resourceType": "Organization", "id": "org2", "name": "Samarqand viloyat shifoxonasi",
         "partOf": {"reference": "Organization/org1"}},
        {"resourceType": "Practitioner", "id": "doc1", "name": [{"family": "Rahimov", "given": ["Dilshod"]}],
         "identifier": [{"system": PINFL, "value": "30101010000011"}]},
        {"resourceType": "Patient", "id": "pat1", "active": True, "gender": "male", "birthDate": "1980-05-06",
         "meta": {"tag": [{"system": "http://dhp.test/tag", "code": "vip"}],
                  "profile": ["https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient"]},
         "identifier": [{"system": PINFL, "value": "31234567890123",
                         "type": {"coding": [{"system": V2_0203, "code": "NI"}]}}],
         "name": [{"family": "Karimov", "given": ["Alisher"]}, {"text": "Каримов Алишер"}],
         "telecom": [{"system": "phone", "value": "+998901234567"}],
         "address": [{"city": "17150085", "district": "1727220", "state": "1727", "country": "UZ",
                      "line": ["Mustaqillik ko'chasi 5"]}],
         "generalPractitioner": [{"reference": "Practitioner/doc1"}],
         "managingOrganization": {"reference": "Organization/org1"}},
        {"resourceType": "Patient", "id": "pat2", "active": False, "meta": {"source": "http://mis.dhp.test/1"}, "gender": "female", "birthDate": "1992-11-20",
         "identifier": [{"system": PINFL, "value": "41234567890123",
                         "type": {"coding": [{"system": V2_0203, "code": "NI"}]}},
                        {"system": "https://dpm.uz/identifier/passport-local", "value": "AB1234567",
                         "type": {"coding": [{"system": V2_0203, "code": "PPN"}]}}],
         "name": [{"family": "Toʻxtayeva", "given": ["Oʻgʻiloy"]}],
         "address": [{"city": "17150086", "district": "1727220", "state": "1727"}],
         "deceasedDateTime": "2024-03-01",
         "managingOrganization": {"reference": "Organization/org2"}},
        {"resourceType": "Patient", "id": "pat3", "gender": "male", "birthDate": "1980",
         "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                "code": "R"}]},
         "name": [{"family": "Núñez", "given": ["José"]}],
         "link": [{"other": {"reference": "Patient/pat1"}, "type": "seealso"}]},
        {"resourceType": "Encounter", "id": "enc1", "status": "completed",
         "subject": {"reference": "Patient/pat1"},
         "actualPeriod": {"start": "2024-01-01T08:00:00Z", "end": "2024-01-01T10:00:00Z"},
         "serviceProvider": {"reference": "Organization/org1"},
         "participant": [{"actor": {"reference": "Practitioner/doc1"}}]},
        {"resourceType": "Encounter", "id": "enc2", "status": "in-progress",
         "subject": {"reference": "Patient/pat2"}, "actualPeriod": {"start": "2024-06-01T08:00:00Z"},
         "serviceProvider": {"reference": "Organization/org2"}},
        _obs("obs1", "pat1", "8867-4", "Heart rate", "2024-01-01T09:00:00Z",
             {"valueQuantity": {"value": 72, "unit": "beats/minute", "system": UCUM, "code": "/min"}},
             encounter={"reference": "Encounter/enc1"}, performer=[{"reference": "Practitioner/doc1"}]),
        _obs("obs2", "pat1", "8480-6", "Systolic blood pressure", "2024-02-15",
             {"valueQuantity": {"value": 120.5, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
             performer=[{"identifier": {"system": PINFL, "value": "30101010000011"}}]),
        _obs("obs3", "pat2", "8867-4", "Heart rate", "2023-06-01T12:30:00+05:00",
             {"valueQuantity": {"value": 88, "unit": "beats/minute", "system": UCUM, "code": "/min"}},
             status="preliminary", encounter={"reference": "Encounter/enc2"}),
        {**_obs("obs4", "pat2", "85354-9", "Blood pressure panel",
                {"start": "2024-05-01T10:00:00Z", "end": "2024-05-01T10:05:00Z"}),
         "component": [
             {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
              "valueQuantity": {"value": 130, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
             {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
              "valueQuantity": {"value": 85, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}}]},
        {"resourceType": "Observation", "id": "obs5", "status": "final",
         "code": {"text": "Tamaki chekish holati"}, "subject": {"reference": "Patient/pat3"},
         "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "8517006", "display": "Ex-smoker"}]},
         "effectiveDateTime": "2022"},
        {"resourceType": "Observation", "id": "obs6", "status": "final",
         "code": {"coding": [{"system": LOINC, "code": "72166-2"}]}, "subject": {"reference": "Patient/pat1"},
         "valueString": "Never smoker, confirmed"},
        {"resourceType": "Location", "id": "loc1", "name": "Toshkent markaziy", "status": "active",
         "position": {"latitude": 41.3111, "longitude": 69.2797}},
        {"resourceType": "Location", "id": "loc2", "name": "Samarqand", "status": "active",
         "position": {"latitude": 39.6542, "longitude": 66.9597}},
        {"resourceType": "List", "id": "list1", "status": "current", "mode": "working",
         "entry": [{"item": {"reference": "Patient/pat1"}}, {"item": {"reference": "Patient/pat3"}}]},
        {"resourceType": "RiskAssessment", "id": "risk1", "status": "final",
         "subject": {"reference": "Patient/pat1"},
         "prediction": [{"probabilityDecimal": 0.35}]},
        {"resourceType": "RiskAssessment", "id": "risk2", "status": "final",
         "subject": {"reference": "Patient/pat2"},
         "prediction": [{"probabilityDecimal": 100}]},
        {"resourceType": "Questionnaire", "id": "q1", "status": "active",
         "url": "http://dhp.test/fhir/Questionnaire/form-096"},
        {"resourceType": "Questionnaire", "id": "q2", "status": "draft",
         "url": "http://dhp.test/fhir/Questionnaire/form-096/birth"},
        {"resourceType": "Condition", "id": "cond1", "subject": {"reference": "Patient/pat1"},
         "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10"}]},
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                        "code": "active"}]},
         "onsetDateTime": "2020-03-10",
         "evidence": [{"reference": {"reference": "Observation/obs2"}}]},
    ]


def document() -> dict[str, Any]:
    """A document Bundle over resources of the data set (submitted after them: documents check references)."""
    return {"resourceType": "Bundle", "id": "doc-bundle", "type": "document",
            "identifier": {"system": "http://dhp.test/docs", "value": "d1"}, "timestamp": "2024-05-01T10:00:00Z",
            "entry": [{"fullUrl": "urn:uuid:6a1f3b0e-6a51-4c55-9f0e-3d5e2b8f6c01", "resource": {
                "resourceType": "Composition", "status": "final",
                "identifier": [{"system": "http://dhp.test/compositions", "value": "c1"}],
                "type": {"coding": [{"system": LOINC, "code": "11503-0"}]},
                "category": [{"coding": [{"system": "http://dhp.test/cat", "code": "birth"}]}],
                "subject": [{"reference": "Patient/pat2"}], "date": "2024-05-01", "title": "Form 096",
                "author": [{"reference": "Practitioner/doc1"}],
                "attester": [{"mode": {"coding": [{"system": "http://hl7.org/fhir/composition-attestation-mode",
                                                   "code": "legal"}]},
                              "time": "2024-05-01T10:00:00Z", "party": {"reference": "Practitioner/doc1"}}],
                "text": {"status": "generated",
                         "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Form 096</div>"}}}]}


def load(live: LiveServer) -> None:
    with httpx.Client(base_url=live.fhir, timeout=60) as c:
        entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
                   for r in dataset()]
        resp = c.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries},
                      headers={"Content-Type": "application/fhir+json"})
        assert resp.status_code == 200, resp.text
        doc = c.put("/Bundle/doc-bundle", json=document(), headers={"Content-Type": "application/fhir+json"})
        assert doc.status_code == 201, doc.text


@pytest.fixture(scope="session", params=["sqlite", "pg"])
def search_server(request: pytest.FixtureRequest, start_server: Callable[..., LiveServer],
                  new_db_url: Callable[[str], str]) -> LiveServer:
    """A server of each backend (validation off: the data exercises search, not profiles) with the data set."""
    live = start_server(DHP_DATABASE_URL=new_db_url(request.param), DHP_AUTH="off", DHP_VALIDATION="off")
    load(live)
    return live


@pytest.fixture()
def fhir(search_server: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=search_server.fhir, timeout=60) as c:
        yield c  # type: ignore[misc]
