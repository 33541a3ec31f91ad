"""DHP's own package uz.dhp.documents: the Form 003 profile (snapshot generated) and its code systems."""

from __future__ import annotations

import json
from typing import Any

import httpx

from dhp.documents import igbuild

_RULES = ("id", "path", "sliceName", "min", "max", "type", "fixedUri", "patternCodeableConcept", "slicing",
          "mustSupport")


def _rules(sd: dict[str, Any]) -> list[dict[str, Any]]:
    """What a snapshot says about instances (documentation text may change with the snapshot generator)."""
    out = []
    for e in sd["snapshot"]["element"]:
        r = {k: e.get(k) for k in _RULES}
        b = e.get("binding") or {}
        r["binding"] = (b.get("strength"), b.get("valueSet"))
        r["constraint"] = sorted(c["key"] for c in e.get("constraint") or ())
        out.append(r)
    return out


def test_package_on_disk_is_what_the_builder_makes(registry: Any) -> None:
    folder = igbuild.FOLDER
    assert json.loads((folder / "package.json").read_text()) == igbuild.manifest()
    for name, res in igbuild.build(registry).items():
        on_disk = json.loads((folder / name).read_text(encoding="utf-8"))
        built = json.loads(igbuild.dump(res))
        stale = f"{name} is stale: run python -m dhp.documents.igbuild"
        if "snapshot" in built:
            assert _rules(on_disk) == _rules(built), stale
            on_disk.pop("snapshot")
            built.pop("snapshot")
        assert on_disk == built, stale


def test_snapshot_carries_the_slices(registry: Any) -> None:
    sd = igbuild.build(registry)[f"StructureDefinition-{igbuild.PROFILE_ID}.json"]
    elems = {e["id"]: e for e in sd["snapshot"]["element"]}
    assert elems["Composition"]["constraint"][-1]["key"].startswith("form003-")
    for code in ("admission", "diagnoses", "procedures", "treatment", "discharge-condition", "disposition"):
        s = elems[f"Composition.section:{code}"]
        assert s["sliceName"] == code
        assert elems[f"Composition.section:{code}.code"]["patternCodeableConcept"]["coding"][0]["code"] == code
    assert elems["Composition.section:diagnoses"]["min"] == 1
    assert elems["Composition.section:diagnoses.entry"]["type"][0]["targetProfile"] == [
        "https://dhp.uz/fhir/core/StructureDefinition/uz-core-clinical-condition"]
    assert elems["Composition.subject"]["max"] == "1" and elems["Composition.custodian"]["min"] == 1
    # Inherited from the base: the snapshot is complete, not just the differential.
    assert "Composition.section.emptyReason" in elems and "Composition.event" in elems


def test_profile_and_codes_are_served(client: httpx.Client) -> None:
    r = client.get("/StructureDefinition", params={"url": igbuild.PROFILE_URL})
    assert r.status_code == 200
    entries = r.json().get("entry") or []
    assert len(entries) == 1 and entries[0]["resource"]["snapshot"]["element"]
    r = client.get("/CodeSystem/$lookup", params={"system": igbuild.SECTION_CS, "code": "disposition",
                                                  "displayLanguage": "ru"})
    assert r.status_code == 200, r.text
    assert {"name": "display", "valueString": "Исход и выписка"} in r.json()["parameter"]
