"""Snapshot generation from differentials, compared element by element with the packaged snapshots."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dhp.validation import generate_snapshot
from dhp.validation.snapshot import SnapshotError

# Every ElementDefinition property is compared (short, definition, comment, requirements, alias, min/max, base,
# type, contentReference, meaningWhenMissing, condition, constraint, mustSupport, isModifier(+Reason),
# isSummary, binding, mapping, slicing, sliceName, fixed/pattern, example, maxLength, min/maxValue, extension …),
# as JSON. Differences the packaged snapshots get wrong per the FHIR snapshot rules would be listed here as
# (StructureDefinition id, element id, property); the generator matches all 31 packaged snapshots exactly, so
# there are none (docs/validation.md, "Snapshots").
ALLOWED_DIFFERENCES: frozenset[tuple[str, str, str]] = frozenset()


def _differences(sd_id: str, want: dict[str, Any], got: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    out = []
    for k in sorted(set(want) | set(got)):
        w, g = json.dumps(want.get(k), sort_keys=True), json.dumps(got.get(k), sort_keys=True)
        if w != g and (sd_id, want["id"], k) not in ALLOWED_DIFFERENCES:
            out.append((sd_id, want["id"], k, w[:300], g[:300]))
    return out


def _dhp_profiles(registry: Any) -> list[dict[str, Any]]:
    out = []
    for p in registry.packages:
        if p.id.startswith("uz.dhp."):
            out += [p.read(m) for m in p.entries if m["resourceType"] == "StructureDefinition"]
    return out


def test_generated_snapshots_match_packaged_ones_element_by_element(registry: Any) -> None:
    sds = _dhp_profiles(registry)
    assert len(sds) >= 30  # 18 UZ Core + 13 Integrations StructureDefinitions
    compared = 0
    for sd in sds:
        gen = generate_snapshot({k: v for k, v in sd.items() if k != "snapshot"}, registry)
        want = sd["snapshot"]["element"]
        got = gen["snapshot"]["element"]
        assert [e["id"] for e in got] == [e["id"] for e in want], sd["id"]
        diffs = [d for w, g in zip(want, got, strict=True) for d in _differences(sd["id"], w, g)]
        assert not diffs, diffs[:5]
        compared += len(want)
    assert compared > 1000


def test_generated_snapshot_has_no_extra_or_missing_properties(registry: Any) -> None:
    """The comparison above is on the whole element: a property the generator drops fails it too."""
    sd = registry.structure_definition("https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient")
    gen = generate_snapshot({k: v for k, v in sd.items() if k != "snapshot"}, registry)
    by_id = {e["id"]: e for e in gen["snapshot"]["element"]}
    # Inherited from core Patient: relative markdown links are made absolute.
    core = registry.structure_definition("http://hl7.org/fhir/StructureDefinition/Patient")
    relative = [(e["id"], k) for e in core["snapshot"]["element"] for k in ("definition", "comment", "requirements")
                if "](" in (e.get(k) or "") and "](http" not in e[k]]
    assert relative
    for eid, k in relative:
        if eid in by_id:
            assert "](http://hl7.org/fhir/" in by_id[eid][k], (eid, k)
    assert _differences("uz-core-patient", sd["snapshot"]["element"][0], gen["snapshot"]["element"][0]) == []
    broken = dict(gen["snapshot"]["element"][1])
    broken.pop("short")
    assert [d[2] for d in _differences("x", sd["snapshot"]["element"][1], broken)] == ["short"]


def test_relative_links_made_absolute() -> None:
    from dhp.validation.snapshot import _absolute_links

    web = "http://hl7.org/fhir/"
    assert _absolute_links("see [Timing](datatypes.html#timing).", web) == \
        "see [Timing](http://hl7.org/fhir/datatypes.html#timing)."
    for kept in ("[a](http://x.org/y)", "[a](#frag)", "[a](/abs)", "[a](urn:uuid:1)", "no links"):
        assert _absolute_links(kept, web) == kept


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
