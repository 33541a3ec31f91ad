"""`dhp validate` in a subprocess: files and folders, text and JSON output, exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhp.validation.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_folder_of_valid_examples_exits_0(uz_core: Any, tmp_path: Path) -> None:
    src = Path(uz_core.root) / "example"
    for name in ("Patient-example-david.json", "Condition-example-cancer.json", "Encounter-example-encounter.json"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    r = run(str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("Patient-example-david.json", "Condition-example-cancer.json"):
        assert name in r.stdout.replace("\n", "")
    assert "3 file(s), 0 with errors" in r.stdout


def test_invalid_file_exits_1_with_json_report(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "resourceType": "Patient",\n  "active": "yes",\n  "birthDate": "2020-13-01"\n}\n')
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"resourceType": "Basic", "code": {"text": "x"}}))
    r = run(str(bad), str(good), "--format", "json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert doc["summary"] == {"files": 2, "failed": 1}
    by_file = {Path(f["path"]).name: f["outcome"] for f in doc["files"]}
    issues = by_file["bad.json"]["issue"]
    active = next(i for i in issues if i.get("expression") == ["Patient.active"])
    assert active["severity"] == "error"
    assert {"url": "http://hl7.org/fhir/StructureDefinition/operationoutcome-issue-line", "valueInteger": 3} \
        in active["extension"]
    assert all(i["severity"] not in ("error", "fatal") for i in by_file["good.json"]["issue"])


def test_profile_option_and_text_output(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"resourceType": "Patient", "name": [{"family": "Karimov"}]}))
    base = run(str(f), "--profile", "http://hl7.org/fhir/StructureDefinition/Patient")
    assert base.returncode == 0, base.stdout + base.stderr
    uz = run(str(f), "--profile", "https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient")
    assert uz.returncode == 1
    assert "cardinality-min" in uz.stdout and "Patient.identifier" in uz.stdout


def test_package_option_loads_a_local_package(tmp_path: Path) -> None:
    pkg = Path(__file__).resolve().parents[3] / "shared" / "packages" / "uz.dhp.integrations-0.1.0.tgz"
    f = tmp_path / "rp.json"
    f.write_text(json.dumps({"resourceType": "RelatedPerson", "patient": {"reference": "Patient/p"}}))
    r = run(str(f), "--package", str(pkg), "--profile",
            "https://dhp.uz/fhir/integrations/StructureDefinition/related-person-birth", "-f", "json")
    assert r.returncode == 1
    ids = [i["details"]["coding"][0]["code"] for i in json.loads(r.stdout)["files"][0]["outcome"]["issue"]
           if i.get("details")]
    assert "slice-cardinality-min" in ids


def test_unparseable_json_and_missing_path(tmp_path: Path) -> None:
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    r = run(str(f))
    assert r.returncode == 1
    assert "json-invalid" in r.stdout
    r = run(str(tmp_path / "nope.json"))
    assert r.returncode == 2
    assert "not found" in r.stderr
