"""Snapshot generation from differentials, compared element by element with the packaged snapshots."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dhp.validation import generate_snapshot
from dhp.validation.snapshot import SnapshotError


def _norm(e: dict[str, Any]) -> dict[str, Any]:
    b = e.get("binding") or {}
    s = e.get("slicing") or {}
    return {
        "path": e.get("path"), "min": e.get("min"), "max": e.get("max"), "sliceName": e.get("sliceName"),
        "mustSupport": bool(e.get("mustSupport")), "maxLength": e.get("maxLength"),
        "contentReference": e.get("contentReference"),
        "type": sorted((t.get("code"), tuple(t.get("profile") or ()), tuple(sorted(t.get("targetProfile") or ())))
                       for t in e.get("type") or ()),
        "fixed": {k: v for k, v in e.items() if k.startswith(("fixed", "pattern"))},
        "binding": (b.get("strength"), b.get("valueSet")),
        "slicing": (json.dumps(s.get("discriminator")), s.get("rules"), bool(s.get("ordered"))) if s else None,
        "constraints": sorted(c["key"] for c in e.get("constraint") or ()),
    }


def _dhp_profiles(registry: Any) -> list[dict[str, Any]]:
    out = []
    for p in registry.packages:
        if p.id.startswith("uz.dhp."):
            out += [p.read(m) for m in p.entries if m["resourceType"] == "StructureDefinition"]
    return out


def test_generated_snapshots_match_packaged_ones_element_by_element(registry: Any) -> None:
    sds = _dhp_profiles(registry)
    assert len(sds) >= 30  # 18 UZ Core + 13 Integrations StructureDefinitions
    for sd in sds:
        gen = generate_snapshot({k: v for k, v in sd.items() if k != "snapshot"}, registry)
        want = sd["snapshot"]["element"]
        got = gen["snapshot"]["element"]
        assert [e["id"] for e in got] == [e["id"] for e in want], sd["id"]
        for w, g in zip(want, got, strict=True):
            assert _norm(g) == _norm(w), (sd["id"], w["id"])


def test_profile_on_profile_patient_birth(registry: Any) -> None:
    """patient-birth is based on uz-core-patient: both lose their snapshots, the chain is rebuilt."""
    birth = registry.structure_definition("https://dhp.uz/fhir/integrations/StructureDefinition/patient-birth")
    assert birth["baseDefinition"].endswith("uz-core-patient")

    class NoSnapshots:
        def structure_definition(self, url: str) -> Any:
            sd = registry.structure_definition(url)
            if sd is not None and sd.get("url", "").startswith("https://dhp.uz/"):
                return {k: v for k, v in sd.items() if k != "snapshot"}
            return sd

    gen = generate_snapshot({k: v for k, v in birth.items() if k != "snapshot"}, NoSnapshots())
    ids = [e["id"] for e in gen["snapshot"]["element"]]
    assert ids == [e["id"] for e in birth["snapshot"]["element"]]
    by_id = {e["id"]: e for e in gen["snapshot"]["element"]}
    assert by_id["Patient.identifier"]["min"] == 1  # from uz-core-patient
    assert by_id["Patient.extension:placeOfBirthType"]["min"] == 1  # from patient-birth


def test_unknown_base_is_a_clear_error(registry: Any) -> None:
    with pytest.raises(SnapshotError, match="not known"):
        generate_snapshot({"resourceType": "StructureDefinition", "url": "http://x/y",
                           "baseDefinition": "http://nowhere.example/StructureDefinition/none",
                           "differential": {"element": []}}, registry)


def test_element_not_in_base_is_a_clear_error(registry: Any) -> None:
    with pytest.raises(SnapshotError, match="not found"):
        generate_snapshot({"resourceType": "StructureDefinition", "url": "http://x/y",
                           "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient",
                           "differential": {"element": [{"id": "Patient.nonsense", "path": "Patient.nonsense",
                                                         "min": 1}]}}, registry)
