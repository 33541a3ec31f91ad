"""Builds DHP's own FHIR package ``uz.dhp.documents`` (folder ``documents/ig/package``).

The differential of the Form 003 profile and the small code systems are written here, in one place; the
snapshot is generated from the base definitions with :func:`dhp.validation.generate_snapshot`, so the
package on disk is a standard FHIR NPM package (differential + snapshot) that any FHIR tool can load.
Run ``python -m dhp.documents.igbuild`` after changing this file; a test checks the folder is up to date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PACKAGE_ID = "uz.dhp.documents"
PACKAGE_VERSION = "0.1.0"
CANONICAL = "https://dhp.uz/fhir/integrations"
TERMINOLOGY = "https://terminology.dhp.uz"
FOLDER = Path(__file__).parent / "ig" / "package"

PROFILE_ID = "form-003-inpatient-medical-record-composition"
PROFILE_URL = f"{CANONICAL}/StructureDefinition/{PROFILE_ID}"
FORM_CS = f"{TERMINOLOGY}/CodeSystem/medical-document-form-cs"
FORM_VS = f"{TERMINOLOGY}/ValueSet/medical-document-form-vs"
SECTION_CS = f"{TERMINOLOGY}/CodeSystem/form-003-section-cs"
SECTION_VS = f"{TERMINOLOGY}/ValueSet/form-003-section-vs"
CORE = "https://dhp.uz/fhir/core/StructureDefinition/"
BASE = "http://hl7.org/fhir/StructureDefinition/"

COMMON = {"version": PACKAGE_VERSION, "status": "draft", "experimental": True, "publisher": "DHP project",
          "jurisdiction": [{"coding": [{"system": "urn:iso:std:iso:3166", "code": "UZ"}]}]}


def _concept(code: str, uz: str, ru: str, en: str, definition: str) -> dict[str, Any]:
    return {"code": code, "display": uz, "definition": definition,
            "designation": [{"language": "ru", "value": ru}, {"language": "en", "value": en}]}


FORMS = [
    _concept("form-003", "003-shakl: statsionar bemorning tibbiy kartasi",
             "Форма 003: медицинская карта стационарного больного", "Form 003: inpatient medical record",
             "The record of one inpatient stay: admission, diagnoses, operations, treatment and discharge."),
    _concept("form-096", "096-shakl: tug'ilish haqida tibbiy guvohnoma",
             "Форма 096: медицинское свидетельство о рождении", "Form 096: birth registration",
             "A maternity ward's record of a birth: newborn(s), mother, delivery and measurements."),
]

SECTIONS = [
    ("admission", "Qabul", "Поступление", "Admission",
     "How and when the patient was admitted: referral, department, dates (the inpatient Encounter).",
     1, "1", [CORE + "uz-core-encounter", BASE + "ServiceRequest"], 1),
    ("diagnoses", "Tashxislar", "Диагнозы", "Diagnoses",
     "Admission, clinical and final diagnoses (ICD-10), the kind given by the diagnosis-type extension.",
     1, "1", [CORE + "uz-core-clinical-condition"], 1),
    ("procedures", "Operatsiyalar va muolajalar", "Операции и процедуры", "Procedures and operations",
     "Surgical operations and other procedures performed during the stay.",
     0, "1", [BASE + "Procedure"], 0),
    ("treatment", "Davolash", "Лечение", "Treatment",
     "Medicines and other treatment given during the stay.",
     0, "1", [BASE + "MedicationStatement", BASE + "MedicationRequest", BASE + "MedicationAdministration",
              BASE + "Procedure"], 0),
    ("discharge-condition", "Chiqishdagi holati", "Состояние при выписке", "Condition at discharge",
     "The patient's condition at discharge, in narrative and as observations.",
     1, "1", [CORE + "uz-core-observation"], 0),
    ("disposition", "Chiqish", "Исход и выписка", "Disposition",
     "Outcome of the stay and where the patient went (home, another facility, death), with follow-up advice.",
     1, "1", [CORE + "uz-core-encounter"], 0),
]


def code_systems() -> list[dict[str, Any]]:
    form_cs = {"resourceType": "CodeSystem", "id": "medical-document-form-cs", "url": FORM_CS,
               "name": "MedicalDocumentFormCS", "title": "Medical document forms", **COMMON,
               "description": "The national medical record forms submitted to DHP as FHIR documents.",
               "caseSensitive": True, "content": "complete", "language": "uz", "count": len(FORMS),
               "concept": FORMS}
    sec_cs = {"resourceType": "CodeSystem", "id": "form-003-section-cs", "url": SECTION_CS,
              "name": "Form003SectionCS", "title": "Form 003 sections", **COMMON,
              "description": "The sections of the Form 003 inpatient medical record document.",
              "caseSensitive": True, "content": "complete", "language": "uz", "count": len(SECTIONS),
              "concept": [_concept(c, uz, ru, en, d) for c, uz, ru, en, d, *_ in SECTIONS]}
    form_vs = {"resourceType": "ValueSet", "id": "medical-document-form-vs", "url": FORM_VS,
               "name": "MedicalDocumentFormVS", "title": "Medical document forms", **COMMON,
               "description": "All medical document forms.", "compose": {"include": [{"system": FORM_CS}]}}
    sec_vs = {"resourceType": "ValueSet", "id": "form-003-section-vs", "url": SECTION_VS,
              "name": "Form003SectionVS", "title": "Form 003 sections", **COMMON,
              "description": "All Form 003 section codes.", "compose": {"include": [{"system": SECTION_CS}]}}
    return [form_cs, sec_cs, form_vs, sec_vs]


def _e(path: str, **kw: Any) -> dict[str, Any]:
    eid = kw.pop("id", path)
    return {"id": eid, "path": path, **kw}


def _ref(*profiles: str) -> list[dict[str, Any]]:
    return [{"code": "Reference", "targetProfile": list(profiles)}]


def differential() -> list[dict[str, Any]]:
    el = [
        _e("Composition", constraint=[{
            "key": "form003-1", "severity": "error",
            "human": "A final or amended inpatient record is attested (Composition.attester)",
            "expression": "(status = 'final' or status = 'amended') implies attester.exists()",
            "source": PROFILE_URL}, {
            "key": "form003-2", "severity": "error",
            "human": "The disposition section tells the outcome in narrative",
            "expression": "section.where(code.coding.where(system = '" + SECTION_CS + "' and code = 'disposition')"
                          ".exists()).all(text.exists())",
            "source": PROFILE_URL}]),
        _e("Composition.identifier", min=1, mustSupport=True,
           short="Stable identity of the record across its versions"),
        _e("Composition.status", mustSupport=True,
           short="preliminary | final | amended | entered-in-error"),
        _e("Composition.type", mustSupport=True, patternCodeableConcept={"coding": [
            {"system": "http://loinc.org", "code": "34105-7"}]},
           short="Hospital discharge summary (LOINC 34105-7)"),
        _e("Composition.category", min=1, mustSupport=True, patternCodeableConcept={"coding": [
            {"system": FORM_CS, "code": "form-003"}]}, short="Form 003"),
        _e("Composition.subject", min=1, max="1", mustSupport=True, type=_ref(CORE + "uz-core-patient")),
        _e("Composition.encounter", min=1, mustSupport=True, type=_ref(CORE + "uz-core-encounter"),
           short="The inpatient stay"),
        _e("Composition.date", mustSupport=True),
        _e("Composition.author", mustSupport=True,
           type=_ref(CORE + "uz-core-practitioner-role", CORE + "uz-core-practitioner", CORE + "uz-core-organization")),
        _e("Composition.title", mustSupport=True),
        _e("Composition.attester", mustSupport=True),
        _e("Composition.attester.party", mustSupport=True,
           type=_ref(CORE + "uz-core-practitioner-role", CORE + "uz-core-practitioner")),
        _e("Composition.custodian", min=1, mustSupport=True, type=_ref(CORE + "uz-core-organization")),
        _e("Composition.relatesTo", mustSupport=True, short="The version this one replaces"),
        _e("Composition.section", min=4, mustSupport=True, slicing={
            "discriminator": [{"type": "pattern", "path": "code"}], "ordered": False, "rules": "open"}),
        _e("Composition.section.code", min=1,
           binding={"strength": "extensible", "valueSet": SECTION_VS}),
    ]
    for code, uz, _ru, en, definition, smin, smax, targets, emin in SECTIONS:
        sid = f"Composition.section:{code}"
        el += [
            _e("Composition.section", id=sid, sliceName=code, min=smin, max=smax, mustSupport=True,
               short=f"{en} ({uz})", definition=definition),
            _e("Composition.section.title", id=f"{sid}.title", min=1, mustSupport=True),
            _e("Composition.section.code", id=f"{sid}.code", min=1, mustSupport=True,
               patternCodeableConcept={"coding": [{"system": SECTION_CS, "code": code}]}),
            _e("Composition.section.text", id=f"{sid}.text", mustSupport=True),
            _e("Composition.section.entry", id=f"{sid}.entry", min=emin, mustSupport=True, type=_ref(*targets)),
        ]
    return el


def profile() -> dict[str, Any]:
    return {
        "resourceType": "StructureDefinition", "id": PROFILE_ID, "url": PROFILE_URL,
        "name": "Form003InpatientMedicalRecordComposition",
        "title": "Form 003: inpatient medical record (Composition)", **COMMON,
        "description": "The Composition of a Form 003 document: one inpatient stay with sections for "
                       "admission, diagnoses (ICD-10 via uz-core-clinical-condition), procedures and operations, "
                       "treatment, condition at discharge and disposition. Entries reuse UZ Core profiles.",
        "fhirVersion": "5.0.0", "kind": "resource", "abstract": False, "type": "Composition",
        "baseDefinition": BASE + "Composition", "derivation": "constraint",
        "differential": {"element": differential()},
    }


def build(registry: Any) -> dict[str, dict[str, Any]]:
    """File name → resource, with the profile's snapshot generated against ``registry``."""
    from dhp.validation import generate_snapshot

    sd = generate_snapshot(profile(), registry)
    files = {f"StructureDefinition-{PROFILE_ID}.json": sd}
    for r in code_systems():
        files[f"{r['resourceType']}-{r['id']}.json"] = r
    return files


def manifest() -> dict[str, Any]:
    return {"name": PACKAGE_ID, "version": PACKAGE_VERSION, "canonical": CANONICAL, "url": CANONICAL,
            "title": "DHP clinical documents (Form 003 profile, document form codes)",
            "description": "Project-authored profiles for DHP clinical documents not covered by the shared "
                           "packages: the Form 003 inpatient medical record Composition.",
            "fhirVersions": ["5.0.0"], "type": "IG", "license": "CC0-1.0", "author": "DHP project",
            "dependencies": {"hl7.fhir.r5.core": "5.0.0", "uz.dhp.core": "0.3.0"}}


def dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write(registry: Any, folder: Path = FOLDER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text(dump(manifest()), encoding="utf-8")
    for name, res in build(registry).items():
        (folder / name).write_text(dump(res), encoding="utf-8")


def main() -> None:
    from dhp.conformance import load_registry
    from dhp.settings import Settings

    write(load_registry(Settings.from_env()))
    # The FHIR package cache keeps the first copy of id#version it saw: drop it so the new build is used.
    import shutil

    cached = Path(Settings.from_env().package_cache) / f"{PACKAGE_ID}#{PACKAGE_VERSION}"
    if cached.is_dir():
        shutil.rmtree(cached)
    print(f"wrote {FOLDER}", file=sys.stderr)


if __name__ == "__main__":
    main()
