"""FHIR packages: local files and folders, the cache, the npm registry, dependency fallback, the registry,
the CLI, and conformance changes reaching every server process."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from dhp.conformance import PackageError, PackageManager, PackageRef, Registry
from dhp.conformance.packages import nearest_version
from dhp.settings import Settings

SHARED = Path(Settings.from_env().package_path.split(":")[0])
REAL_CACHE = Path(Settings.from_env().package_cache)


def test_package_ref_parsing() -> None:
    assert PackageRef.parse("uz.dhp.core#0.3.0") == PackageRef("uz.dhp.core", "0.3.0")
    assert PackageRef.parse("hl7.fhir.r5.core@5.0.0") == PackageRef("hl7.fhir.r5.core", "5.0.0")
    with pytest.raises(PackageError):
        PackageRef.parse("no-version")


def test_nearest_version() -> None:
    assert nearest_version("6.5.0", ["7.0.1"]) == "7.0.1"
    assert nearest_version("5.2.0", ["5.3.0-ballot-tc1", "5.1.0"]) == "5.3.0-ballot-tc1"
    assert nearest_version("1.0.0", ["1.0.0", "2.0.0"]) == "1.0.0"
    assert nearest_version("9.0.0", ["1.0.0", "2.0.0"]) == "2.0.0"
    assert nearest_version("1.1.0", ["1.2.0", "1.3.0", "2.0.0"]) == "1.2.0"
    assert nearest_version("1.0.0", []) is None


def _cache_with_base(tmp_path: Path) -> Path:
    """A fresh cache that already holds the HL7 base packages (linked from the real cache)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for d in REAL_CACHE.iterdir():
        if d.name.startswith("hl7."):
            (cache / d.name).symlink_to(d)
    return cache


def test_local_tgz_install_and_dependency_fallback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = _cache_with_base(tmp_path)
    pm = PackageManager(cache, [SHARED], registries=[])
    assert PackageRef("uz.dhp.core", "0.3.0") in pm.local()
    with caplog.at_level(logging.WARNING, logger="dhp.packages"):
        pkgs = pm.resolve(["uz.dhp.integrations#0.1.0"])
    refs = [str(p.ref) for p in pkgs]
    assert refs[-1] == "uz.dhp.integrations#0.1.0"
    assert "uz.dhp.core#0.3.0" in refs and "hl7.fhir.r5.core#5.0.0" in refs
    # dependencies load before the packages that need them
    assert refs.index("hl7.fhir.r5.core#5.0.0") < refs.index("uz.dhp.core#0.3.0") < refs.index(refs[-1])
    # hl7.terminology.r5 6.5.0 / extensions 5.2.0 are named by dependencies but absent: nearest, with a warning
    assert any("6.5.0" in r.message or "5.2.0" in r.message for r in caplog.records)
    assert (cache / "uz.dhp.core#0.3.0" / "package" / "package.json").is_file()
    assert (cache / "uz.dhp.core#0.3.0" / "package" / ".dhp-index.json").is_file()


def test_missing_version_falls_back_to_nearest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pm = PackageManager(tmp_path / "cache", [SHARED], registries=[])
    with caplog.at_level(logging.WARNING, logger="dhp.packages"):
        got = pm.ensure(PackageRef("uz.dhp.core", "0.2.0"))
    assert got == PackageRef("uz.dhp.core", "0.3.0")
    assert any("not available" in r.message for r in caplog.records)
    with pytest.raises(PackageError):
        pm.ensure(PackageRef("no.such.package", "1.0.0"))


def test_unpacked_folder_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with tarfile.open(SHARED / "uz.dhp.integrations-0.1.0.tgz") as t:
        t.extractall(src, filter="data")
    pm = PackageManager(tmp_path / "cache", [src], registries=[])
    assert pm.local() == {PackageRef("uz.dhp.integrations", "0.1.0"): src}
    ref = pm.ensure(PackageRef("uz.dhp.integrations", "0.1.0"))
    pkg = pm.open(ref)
    assert any(e.get("id") == "patient-birth" for e in pkg.entries)


def test_unsafe_archive_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in (("package/package.json", b'{"name":"evil","version":"1.0.0"}'),
                           ("package/../../escape.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    with pytest.raises(PackageError):
        pm.install_tgz(buf.getvalue())
    assert not (tmp_path / "escape.json").exists()


def test_download_from_npm_registry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # An unreachable registry first: the next one is used, with a warning, not a crash.
    pm = PackageManager(tmp_path / "cache", [], registries=["http://127.0.0.1:9/", "npm"], timeout=30)
    with caplog.at_level(logging.WARNING, logger="dhp.packages"):
        ref = pm.ensure(PackageRef("hl7.fhir.uv.extensions.r5", "5.3.0-ballot-tc1"))
    assert ref.version == "5.3.0-ballot-tc1"
    pkg = pm.open(ref)
    assert len(pkg.entries) > 500
    assert any(e.get("resourceType") == "StructureDefinition" for e in pkg.entries)
    assert any("unreachable" in r.message for r in caplog.records)


def test_registry_resolution(registry: Registry) -> None:
    patient = registry.resolve("https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient")
    assert patient is not None and patient["type"] == "Patient"
    version = patient.get("version")
    if version:
        same = registry.resolve(f"https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient|{version}")
        assert same is patient
    assert registry.resolve("https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient|99.0") is None
    assert registry.resolve("http://hl7.org/fhir/StructureDefinition/Patient")["kind"] == "resource"
    types = registry.resource_types()
    assert {"Patient", "Observation", "Bundle", "Parameters"} <= types
    assert "DomainResource" not in types and "Resource" not in types
    assert registry.resolve("https://terminology.dhp.uz/fhir/core/ValueSet/mahalla-vs", "ValueSet") is not None
    for t in ("SearchParameter", "CodeSystem", "ValueSet", "ConceptMap", "NamingSystem", "OperationDefinition",
              "CapabilityStatement", "CompartmentDefinition"):
        assert next(registry.iter_meta(t), None) is not None, t


def test_registry_overlay_wins_and_notifies() -> None:
    from dhp.conformance import load_registry

    reg = load_registry(Settings.from_env())
    url = "https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient"
    calls: list[int] = []
    reg.listeners.append(lambda: calls.append(reg.epoch))
    mine = {"resourceType": "StructureDefinition", "id": "x", "url": url, "version": "9.9.9", "name": "Mine"}
    reg.set_overlay([mine], epoch=7)
    assert reg.resolve(url)["name"] == "Mine"
    assert reg.resolve(url + "|9.9.9")["name"] == "Mine"
    assert reg.resolve(url + "|1.0.0") is None
    assert calls == [7]
    reg.set_overlay([], epoch=8)
    assert reg.resolve(url)["name"] == "UZCorePatient"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhp.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_cli_packages_install_and_list(tmp_path: Path) -> None:
    cache = _cache_with_base(tmp_path)
    env = {"DHP_PACKAGE_CACHE": str(cache), "DHP_PACKAGE_REGISTRIES": "npm"}
    r = _cli("packages", "install", str(SHARED / "uz.dhp.integrations-0.1.0.tgz"), env=env)
    assert r.returncode == 0, r.stderr
    assert "uz.dhp.integrations#0.1.0" in r.stdout and "uz.dhp.core#0.3.0" in r.stdout
    r = _cli("packages", "install", "uz.dhp.core#0.3.0", env=env)
    assert r.returncode == 0 and "uz.dhp.core#0.3.0" in r.stdout
    r = _cli("packages", "list", env={**env, "COLUMNS": "200"})
    assert r.returncode == 0 and "uz.dhp.integrations" in r.stdout and "hl7.fhir.r5.core" in r.stdout
    r = _cli("packages", "install", "no.such.pkg#1.0.0", env={**env, "DHP_PACKAGE_REGISTRIES": ""})
    assert r.returncode == 1 and "not found" in r.stderr


def test_cli_db_upgrade(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    r = _cli("db", "upgrade", env={"DHP_DATABASE_URL": url})
    assert r.returncode == 0, r.stderr
    import sqlite3

    names = {row[0] for row in sqlite3.connect(tmp_path / "cli.db").execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"resources", "history", "counters", "alembic_version"} <= names


def test_all_packages_stored_and_searchable_readable(start_server: Callable[..., Any],
                                                     new_db_url: Callable[[str], str]) -> None:
    """With the default DHP_PACKAGE_IMPORT=all, base-spec conformance resources are REST resources too."""
    s = start_server(DHP_DATABASE_URL=new_db_url("sqlite"), DHP_AUTH="off")
    with httpx.Client(base_url=s.fhir, timeout=60) as c:
        sd = c.get("/StructureDefinition/Patient")
        assert sd.status_code == 200 and sd.json()["url"] == "http://hl7.org/fhir/StructureDefinition/Patient"
        assert c.get("/SearchParameter/individual-birthdate").status_code == 200
        assert c.get("/CodeSystem/address-use-cs").status_code == 200
        assert c.get("/StructureDefinition/Patient/_history").json()["total"] == 1


def test_conformance_change_reaches_other_processes(start_server: Callable[..., Any],
                                                    new_db_url: Callable[[str], str]) -> None:
    """Two stateless servers on one PostgreSQL: a profile created on A shows on B without a restart."""
    url = new_db_url("pg")
    a = start_server(DHP_DATABASE_URL=url, DHP_AUTH="off", DHP_VALIDATION="off", DHP_PACKAGE_IMPORT="none")
    b = start_server(DHP_DATABASE_URL=url, DHP_AUTH="off", DHP_VALIDATION="off", DHP_PACKAGE_IMPORT="none")
    profile_url = "https://example.uz/fhir/StructureDefinition/test-patient-" + str(time.time_ns())
    sd = {"resourceType": "StructureDefinition", "url": profile_url, "name": "TestPatient", "status": "draft",
          "kind": "resource", "abstract": False, "type": "Patient", "derivation": "constraint",
          "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient", "fhirVersion": "5.0.0",
          "differential": {"element": [{"id": "Patient.birthDate", "path": "Patient.birthDate", "min": 1}]}}

    def supported(server: Any) -> list[str]:
        cs = httpx.get(server.fhir + "/metadata", timeout=60).json()
        pt = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Patient")
        return pt.get("supportedProfile", [])

    assert profile_url not in supported(b)
    r = httpx.post(a.fhir + "/StructureDefinition", content=orjson.dumps(sd),
                   headers={"Content-Type": "application/fhir+json"}, timeout=60)
    assert r.status_code == 201, r.text
    assert profile_url in supported(a)
    deadline = time.time() + 10
    while profile_url not in supported(b):
        assert time.time() < deadline, "server B never saw the new profile"
        time.sleep(0.3)
        # any FHIR request makes B check the conformance epoch (at most once a second)
        httpx.post(b.fhir + "/Basic", content=b'{"resourceType":"Basic","code":{"text":"x"}}',
                   headers={"Content-Type": "application/fhir+json"}, timeout=60)
    # deleting it takes it away again
    sid = r.json()["id"]
    assert httpx.delete(f"{a.fhir}/StructureDefinition/{sid}", timeout=60).status_code == 204
    assert profile_url not in supported(a)


def test_conformance_poll_zero_checks_on_every_request(start_server: Callable[..., Any],
                                                       new_db_url: Callable[[str], str]) -> None:
    """DHP_CONFORMANCE_POLL=0: server B looks at the conformance epoch on every request, so the first request
    after A's write already sees the new profile. Bad values stop start-up with a clear message."""
    url = new_db_url("pg")
    a = start_server(DHP_DATABASE_URL=url, DHP_AUTH="off", DHP_VALIDATION="off", DHP_PACKAGE_IMPORT="none")
    b = start_server(DHP_DATABASE_URL=url, DHP_AUTH="off", DHP_VALIDATION="off", DHP_PACKAGE_IMPORT="none",
                     DHP_CONFORMANCE_POLL="0")
    vs_url = "https://example.uz/fhir/ValueSet/poll-" + str(time.time_ns())
    vs = {"resourceType": "ValueSet", "url": vs_url, "name": "Poll", "status": "draft",
          "compose": {"include": [{"system": "http://example.uz/cs", "concept": [{"code": "a"}]}]}}

    def write_on_b() -> None:  # a write checks the epoch first (when the poll interval has passed)
        w = httpx.post(b.fhir + "/Basic", content=b'{"resourceType":"Basic","code":{"text":"x"}}',
                       headers={"Content-Type": "application/fhir+json"}, timeout=60)
        assert w.status_code == 201

    write_on_b()  # B has just checked: with the default interval it would not look again for a second
    r = httpx.post(a.fhir + "/ValueSet", content=orjson.dumps(vs), headers={"Content-Type": "application/fhir+json"},
                   timeout=60)
    assert r.status_code == 201, r.text
    write_on_b()
    assert b.server.registry.resolve(vs_url) is not None
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(ValueError, match="DHP_CONFORMANCE_POLL"):
            Settings.from_env({"DHP_CONFORMANCE_POLL": bad})
    assert Settings.from_env({"DHP_CONFORMANCE_POLL": "2.5"}).conformance_poll == 2.5
