"""Realistic clinical documents: Form 096 (birth of twins, one stillborn) and Form 003 (an inpatient stay).

Each builder returns a fresh dict so tests can break one rule at a time.
"""

from __future__ import annotations

import copy
import uuid
from decimal import Decimal
from typing import Any

INT = "https://dhp.uz/fhir/integrations/StructureDefinition/"
CORE = "https://dhp.uz/fhir/core/StructureDefinition/"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
FORM_CS = "https://terminology.dhp.uz/CodeSystem/medical-document-form-cs"
SECTION_CS = "https://terminology.dhp.uz/CodeSystem/form-003-section-cs"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DAR = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
PINFL = "https://dpm.uz/identifier/national-unique-id"


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def narrative(text: str) -> dict[str, str]:
    return {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><p>{text}</p></div>'}


def organization(tax_id: str = "200935935", name: str = "Toshkent shahar 4-son tug'ruq majmuasi") -> dict[str, Any]:
    return {"resourceType": "Organization", "meta": {"profile": [CORE + "uz-core-organization"]},
            "identifier": [{"use": "official", "type": {"coding": [{"system": V2_0203, "code": "TAX",
                                                                    "display": "Tax ID number"}]},
                            "system": "https://soliq.uz", "value": tax_id}],
            "active": True, "name": name}


def practitioner(pid: str) -> dict[str, Any]:
    return {"resourceType": "Practitioner", "meta": {"profile": [CORE + "uz-core-practitioner"]},
            "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "NI",
                                                 "display": "National unique individual identifier"}]},
                            "system": "https://hrm.argos.uz", "value": pid}],
            "active": True, "name": [{"use": "official", "family": "Karimova", "given": ["Dilnoza"],
                                      "text": "Karimova Dilnoza"}], "gender": "female"}


def practitioner_role(prac: str, org: str) -> dict[str, Any]:
    return {"resourceType": "PractitionerRole", "meta": {"profile": [CORE + "uz-core-practitioner-role"]},
            "active": True, "practitioner": {"reference": prac}, "organization": {"reference": org},
            "code": [{"coding": [{"system": "https://terminology.dhp.uz/fhir/core/CodeSystem/"
                                            "position-and-profession-cs", "code": "2212.14",
                                  "display": "Vrach ginekolog"}]}]}


def mother_patient(pinfl: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "meta": {"profile": [CORE + "uz-core-patient"]},
            "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "NI",
                                                 "display": "National unique individual identifier"}]},
                            "system": PINFL, "value": pinfl}],
            "active": True, "name": [{"use": "usual", "family": "Rahimova", "given": ["Malika"],
                                      "text": "Rahimova Malika"}],
            "gender": "female", "birthDate": "1996-03-14"}


def newborn(*, name: str | None, gender: str, born: str, order: int, deceased: bool = False) -> dict[str, Any]:
    p: dict[str, Any] = {
        "resourceType": "Patient", "meta": {"profile": [INT + "patient-birth"]},
        "extension": [
            {"url": INT + "patient-placeOfBirthType", "valueCodeableConcept": {"coding": [
                {"system": "https://terminology.dhp.uz/CodeSystem/birth-place-cs", "code": "birth0004.00003",
                 "display": "Shifoxona"}]}},
            {"url": INT + "multiple-birth-flag", "valueBoolean": True},
            {"url": INT + "newborn-birth-time", "valueDateTime": born},
        ],
        # A newborn has no PINFL yet: the required identifier carries a data-absent-reason.
        "identifier": [{"extension": [{"url": DAR, "valueCode": "temp-unknown" if not deceased
                                       else "not-applicable"}]}],
        "gender": gender, "birthDate": born[:10], "multipleBirthInteger": order,
    }
    if name is not None:
        p["name"] = [{"use": "usual", "family": "Rahimov" if gender == "male" else "Rahimova", "given": [name]}]
    else:
        # A stillborn child is not named; the name's absence is stated, not implied.
        p["name"] = [{"extension": [{"url": DAR, "valueCode": "not-applicable"}]}]
    if deceased:
        p["deceasedDateTime"] = born
    return p


def mother_related(patient_ref: str, pinfl: str) -> dict[str, Any]:
    return {"resourceType": "RelatedPerson", "meta": {"profile": [INT + "related-person-birth"]},
            "extension": [{"url": INT + "relatedperson-education", "valueCodeableConcept": {"coding": [
                {"system": "https://terminology.dhp.uz/fhir/core/CodeSystem/education-cs", "code": "regis0005.00008",
                 "display": "Oliy ma'lumot"}]}}],
            "identifier": [{"use": "official", "type": {"coding": [{"system": V2_0203, "code": "PPN",
                                                                    "display": "Passport number"}]},
                            "system": "https://dpm.uz/identifier/passport-international", "value": "FA" + pinfl[-7:]}],
            "active": True, "patient": {"reference": patient_ref},
            "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
                                          "code": "NOK", "display": "next of kin"}], "text": "Ona"}],
            "name": [{"use": "usual", "family": "Rahimova", "given": ["Malika"], "text": "Rahimova Malika"}],
            "gender": "female", "birthDate": "1996-03-14"}


def birth_encounter(subject: str, attendant: str, org: str, start: str) -> dict[str, Any]:
    return {"resourceType": "Encounter", "meta": {"profile": [INT + "encounter-birth"]},
            "status": "completed",
            "class": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                                   "display": "inpatient encounter"}]}],
            "subject": {"reference": subject}, "serviceProvider": {"reference": org},
            "participant": [
                {"type": [{"coding": [{"system": LOINC, "code": "87286-1"}]}], "actor": {"reference": attendant}},
                {"type": [{"coding": [{"system": LOINC, "code": "87287-9"}]}], "actor": {"reference": attendant}},
            ],
            "actualPeriod": {"start": start, "end": start[:11] + "23:00:00+05:00"}}


def quantity_obs(subject: str, performer: str, code: str, display: str, value: Decimal | int, unit_code: str,
                 ucum: str, when: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "meta": {"profile": [INT + "observation-birth"]},
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": {"reference": subject}, "effectiveDateTime": when, "performer": [{"reference": performer}],
            "valueQuantity": {"value": value, "unit": unit_code, "system": UCUM, "code": ucum}}


def apgar(subject: str, performer: str, code: str, minute: int, score: int | None, when: str) -> dict[str, Any]:
    o: dict[str, Any] = {
        "resourceType": "Observation", "meta": {"profile": [INT + "observation-apgar"]}, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "survey", "display": "Survey"}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": f"{minute} minute Apgar Score"}]},
        "subject": {"reference": subject}, "effectiveDateTime": when, "performer": [{"reference": performer}]}
    if score is None:
        o["dataAbsentReason"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                             "code": "not-applicable", "display": "Not Applicable"}],
                                 "text": "O'lik tug'ilgan (stillbirth)"}
    else:
        o["valueQuantity"] = {"value": score, "unit": "birth002.0004", "system": UCUM, "code": "{score}"}
    return o


def pinfl() -> str:
    """A fresh 14-digit PINFL, so documents of different tests do not share a person."""
    return "4" + str(uuid.uuid4().int)[:13]


def form_096(*, mother_pinfl: str | None = None, doc_id: str | None = None,
             status: str = "final") -> dict[str, Any]:
    """Twins born in a maternity ward: a live-born girl and a stillborn boy, with an APGAR series."""
    mother_pinfl = mother_pinfl or pinfl()
    u = {k: urn() for k in ("comp", "org", "prac", "role", "mother", "rp1", "rp2", "baby1", "baby2", "enc",
                            "w1", "w2", "l1", "ga", "a1", "a5", "a1b")}
    born1, born2 = "2026-03-02T10:15:00+05:00", "2026-03-02T10:31:00+05:00"
    entries: list[tuple[str, dict[str, Any]]] = [
        (u["baby1"], newborn(name="Zarina", gender="female", born=born1, order=1)),
        (u["baby2"], newborn(name=None, gender="male", born=born2, order=2, deceased=True)),
        (u["mother"], mother_patient(mother_pinfl)),
        (u["rp1"], mother_related(u["baby1"], mother_pinfl)),
        (u["rp2"], mother_related(u["baby2"], mother_pinfl)),
        (u["enc"], birth_encounter(u["baby1"], u["prac"], u["org"], born1)),
        (u["w1"], quantity_obs(u["baby1"], u["prac"], "8339-4", "Birth weight Measured", Decimal("2.450"),
                               "birth002.0001", "kg", born1)),
        (u["w2"], quantity_obs(u["baby2"], u["prac"], "8339-4", "Birth weight Measured", Decimal("2.100"),
                               "birth002.0001", "kg", born2)),
        (u["l1"], quantity_obs(u["baby1"], u["prac"], "89269-5", "Body height Measured --at birth", 46,
                               "birth002.0002", "cm", born1)),
        (u["ga"], quantity_obs(u["baby1"], u["prac"], "76516-4", "Gestational age--at birth", 36,
                               "birth002.0003", "wk", born1)),
        (u["a1"], apgar(u["baby1"], u["prac"], "9272-6", 1, 7, born1)),
        (u["a5"], apgar(u["baby1"], u["prac"], "9274-2", 5, 9, born1)),
        (u["a1b"], apgar(u["baby2"], u["prac"], "9272-6", 1, None, born2)),
        (u["prac"], practitioner("4402198700123")),
        (u["role"], practitioner_role(u["prac"], u["org"])),
        (u["org"], organization()),
    ]
    comp = {
        "resourceType": "Composition", "meta": {"profile": [INT + "composition-birth"]},
        "identifier": [{"system": "https://dhp.uz/fhir/integrations/NamingSystem/form-096",
                        "value": doc_id or f"096-{uuid.uuid4().hex[:12]}"}],
        "status": status,
        "type": {"coding": [{"system": LOINC, "code": "71230-7", "display": "Birth certificate"}]},
        "category": [{"coding": [{"system": FORM_CS, "code": "form-096",
                                  "display": "Form 096: birth registration"}]}],
        "subject": [{"reference": u["baby1"]}, {"reference": u["baby2"]}],
        "encounter": {"reference": u["enc"]},
        "date": "2026-03-02T12:00:00+05:00",
        "author": [{"reference": u["role"]}],
        "title": "Tug'ilish haqida tibbiy guvohnoma (096-shakl)",
        "attester": [{"mode": {"coding": [{"system": "http://hl7.org/fhir/composition-attestation-mode",
                                           "code": "legal", "display": "Legal"}]},
                      "time": "2026-03-02T12:05:00+05:00", "party": {"reference": u["role"]}}],
        "custodian": {"reference": u["org"]},
        "section": [
            {"title": "Yangi tug'ilganlar", "code": {"coding": [{"system": LOINC, "code": "57075-4",
                                                                 "display": "Newborn delivery information"}]},
             "entry": [{"reference": u["baby1"]}, {"reference": u["baby2"]}]},
            {"title": "Ona", "entry": [{"reference": u["mother"]}, {"reference": u["rp1"]},
                                       {"reference": u["rp2"]}]},
            {"title": "Tug'ruq", "text": narrative("Egizaklar: tirik qiz va o'lik tug'ilgan o'g'il."),
             "entry": [{"reference": u["enc"]}]},
            {"title": "O'lchovlar va Apgar shkalasi",
             "entry": [{"reference": u[k]} for k in ("w1", "w2", "l1", "ga", "a1", "a5", "a1b")]},
        ],
    }
    bundle = {"resourceType": "Bundle", "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/Bundle"]},
              "identifier": {"system": "https://dhp.uz/fhir/integrations/NamingSystem/document-bundle",
                             "value": str(uuid.uuid4())},
              "type": "document", "timestamp": "2026-03-02T12:10:00+05:00",
              "entry": [{"fullUrl": u["comp"], "resource": comp}] + [{"fullUrl": k, "resource": v}
                                                                    for k, v in entries]}
    return bundle


def condition(subject: str, enc: str, icd: str, display: str, dtype: str, dtype_display: str,
              recorder: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "meta": {"profile": [CORE + "uz-core-clinical-condition"]},
            "extension": [{"url": CORE + "diagnosis-type", "valueCodeableConcept": {"coding": [
                {"system": "https://terminology.dhp.uz/fhir/core/CodeSystem/diagnosis-type-cs", "code": dtype,
                 "display": dtype_display}]}}],
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                           "code": "resolved"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                               "code": "confirmed"}]},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": icd, "display": display}]},
            "subject": {"reference": subject}, "encounter": {"reference": enc},
            "participant": [{"actor": {"reference": recorder}}],
            "recordedDate": "2026-02-10"}


def form_003(*, patient_pinfl: str | None = None, doc_id: str | None = None,
             status: str = "final") -> dict[str, Any]:
    """An inpatient stay: acute appendicitis, appendectomy, discharge home."""
    patient_pinfl = patient_pinfl or pinfl()
    u = {k: urn() for k in ("comp", "pat", "enc", "org", "prac", "role", "dx1", "dx2", "proc", "obs", "med")}
    pat = mother_patient(patient_pinfl)
    pat["name"] = [{"use": "usual", "family": "Usmonov", "given": ["Salim"], "text": "Usmonov Salim"}]
    pat["gender"] = "male"
    pat["birthDate"] = "1994-01-27"
    enc = {"resourceType": "Encounter", "meta": {"profile": [CORE + "uz-core-encounter"]}, "status": "completed",
           "class": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                                  "display": "inpatient encounter"}]}],
           "subject": {"reference": u["pat"]}, "serviceProvider": {"reference": u["org"]},
           "actualPeriod": {"start": "2026-02-10T08:40:00+05:00", "end": "2026-02-16T11:00:00+05:00"},
           "diagnosis": [{"condition": [{"reference": {"reference": u["dx1"]}}]},
                         {"condition": [{"reference": {"reference": u["dx2"]}}]}],
           "admission": {"admitSource": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/admit-source",
                                                     "code": "hosp-trans", "display": "Transferred from other hospital"}]},
                         "dischargeDisposition": {"coding": [{
                             "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": "home",
                             "display": "Home"}]}}}
    proc = {"resourceType": "Procedure", "status": "completed",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "80146002", "display": "Appendectomy"}],
                     "text": "Laparoskopik appendektomiya"},
            "subject": {"reference": u["pat"]}, "encounter": {"reference": u["enc"]},
            "occurrencePeriod": {"start": "2026-02-10T13:00:00+05:00", "end": "2026-02-10T14:10:00+05:00"},
            "performer": [{"actor": {"reference": u["prac"]}}],
            "reason": [{"reference": {"reference": u["dx2"]}}]}
    obs = {"resourceType": "Observation", "meta": {"profile": [CORE + "uz-core-observation"]}, "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "vital-signs"}]}],
           "code": {"coding": [{"system": LOINC, "code": "8310-5", "display": "Body temperature"}]},
           "subject": {"reference": u["pat"]}, "encounter": {"reference": u["enc"]},
           "effectiveDateTime": "2026-02-16T09:00:00+05:00",
           "valueQuantity": {"value": Decimal("36.6"), "unit": "Cel", "system": UCUM, "code": "Cel"}}
    med = {"resourceType": "MedicationStatement", "status": "recorded",
           "medication": {"concept": {"text": "Seftriakson 1 g v/i, kuniga 1 marta, 5 kun"}},
           "subject": {"reference": u["pat"]}, "encounter": {"reference": u["enc"]},
           "effectivePeriod": {"start": "2026-02-10", "end": "2026-02-15"}}

    def sec(code: str, title: str, refs: list[str], text: str | None = None) -> dict[str, Any]:
        s: dict[str, Any] = {"title": title, "code": {"coding": [{"system": SECTION_CS, "code": code}]}}
        if text:
            s["text"] = narrative(text)
        if refs:
            s["entry"] = [{"reference": r} for r in refs]
        return s

    comp = {
        "resourceType": "Composition", "meta": {"profile": [INT + "form-003-inpatient-medical-record-composition"]},
        "identifier": [{"system": "https://dhp.uz/fhir/integrations/NamingSystem/form-003",
                        "value": doc_id or f"003-{uuid.uuid4().hex[:12]}"}],
        "status": status,
        "type": {"coding": [{"system": LOINC, "code": "34105-7", "display": "Hospital Discharge summary"}]},
        "category": [{"coding": [{"system": FORM_CS, "code": "form-003",
                                  "display": "Form 003: inpatient medical record"}]}],
        "subject": [{"reference": u["pat"]}], "encounter": {"reference": u["enc"]},
        "date": "2026-02-16T12:00:00+05:00", "author": [{"reference": u["role"]}],
        "title": "Statsionar bemorning tibbiy kartasi (003-shakl)",
        "attester": [{"mode": {"coding": [{"system": "http://hl7.org/fhir/composition-attestation-mode",
                                           "code": "legal"}]},
                      "time": "2026-02-16T12:30:00+05:00", "party": {"reference": u["role"]}}],
        "custodian": {"reference": u["org"]},
        "section": [
            sec("admission", "Qabul", [u["enc"]], "Shoshilinch yo'llanma bilan 10.02.2026 kuni jarrohlik bo'limiga "
                                                  "yotqizildi."),
            sec("diagnoses", "Tashxislar", [u["dx1"], u["dx2"]]),
            sec("procedures", "Operatsiyalar", [u["proc"]]),
            sec("treatment", "Davolash", [u["med"]]),
            sec("discharge-condition", "Chiqishdagi holati", [u["obs"]], "Qoniqarli. Yara bitgan."),
            sec("disposition", "Chiqish", [], "Uyga javob berildi; 7 kundan keyin jarroh ko'rigi."),
        ],
    }
    entries = [
        (u["pat"], pat), (u["enc"], enc),
        (u["dx1"], condition(u["pat"], u["enc"], "R10.3", "Pain localized to other parts of lower abdomen",
                             "gencl-0001-00002", "Qabulxona tashxisi", u["prac"])),
        (u["dx2"], condition(u["pat"], u["enc"], "K35.8", "Acute appendicitis, other and unspecified",
                             "gencl-0001-00008", "Yakuniy tashxis", u["prac"])),
        (u["proc"], proc), (u["obs"], obs), (u["med"], med),
        (u["prac"], practitioner("5501198100456")), (u["role"], practitioner_role(u["prac"], u["org"])),
        (u["org"], organization("201122334", "Respublika shoshilinch tibbiy yordam ilmiy markazi")),
    ]
    return {"resourceType": "Bundle",
            "identifier": {"system": "https://dhp.uz/fhir/integrations/NamingSystem/document-bundle",
                           "value": str(uuid.uuid4())},
            "type": "document", "timestamp": "2026-02-16T12:40:00+05:00",
            "entry": [{"fullUrl": u["comp"], "resource": comp}] + [{"fullUrl": k, "resource": v}
                                                                  for k, v in entries]}


def entry_of(bundle: dict[str, Any], rtype: str, n: int = 0) -> dict[str, Any]:
    """The n-th entry resource of a type (for breaking one rule in a test)."""
    found = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]
    return found[n]


def clone(bundle: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(bundle)
