"""Hostile and malformed FHIR packages, canonical version precedence, and the CLI's failure modes.

Complements test_packages.py: every bad input must end in a PackageError (a clear CLI message, exit 1) and
never put files outside the cache, crash the registry or lose what is already installed.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from dhp.conformance import PackageError, PackageManager, PackageRef, Registry
from dhp.conformance.packages import nearest_version


def _tgz(files: list[tuple[str, bytes]], links: tuple[tuple[str, str, bytes], ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target, kind in links:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            t.addfile(info)
    return buf.getvalue()


def _manifest(**fields: Any) -> tuple[str, bytes]:
    return "package/package.json", orjson.dumps(fields)


def _sd(url: str, version: str, name: str) -> bytes:
    return orjson.dumps({"resourceType": "StructureDefinition", "id": name, "url": url, "version": version,
                         "name": name, "kind": "resource", "type": "Patient", "derivation": "constraint"})


def test_manifest_name_cannot_escape_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "a" / "b" / "cache"
    pm = PackageManager(cache, [], registries=[])
    for name, version in (("../../evil", "1.0.0"), ("ok", "1/../x"), ("/abs", "1.0.0"), ("ok", 1)):
        with pytest.raises(PackageError, match="invalid"):
            pm.install_tgz(_tgz([_manifest(name=name, version=version)]))
    assert [p for p in tmp_path.rglob("*") if p.name not in ("a", "b", "cache")] == []


@pytest.mark.parametrize("data", [
    b"", b"not a tar at all",
    _tgz([("package/package.json", b"{not json")]),
    _tgz([("package/package.json", b"[1, 2]")]),
    _tgz([_manifest(version="1.0.0")]),
    _tgz([("package/other.json", b"{}")]),
    _tgz([_manifest(name="a", version="1.0.0"), ("C:/windows/x.json", b"{}")]),
], ids=["empty", "not-tar", "bad-json", "list", "no-name", "no-manifest", "drive-path"])
def test_malformed_archives_fail_cleanly(tmp_path: Path, data: bytes) -> None:
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    with pytest.raises(PackageError):
        pm.install_tgz(data)


def test_dot_slash_members_and_links(tmp_path: Path) -> None:
    """``./package/...`` members land in package/ (not package/package/); links are never unpacked."""
    data = _tgz([("./package/package.json", orjson.dumps({"name": "ds", "version": "1.0.0"})),
                 ("./package/StructureDefinition-x.json", _sd("http://x/sd", "1.0.0", "x"))],
                (("package/passwd.json", "/etc/passwd", tarfile.SYMTYPE),
                 ("package/hard.json", "/etc/passwd", tarfile.LNKTYPE)))
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    ref = pm.install_tgz(data)
    [pkg] = pm.resolve([ref])
    assert [e["id"] for e in pkg.entries] == ["x"]
    assert not (pm.path_of(ref) / "passwd.json").exists()


def test_odd_resource_files_do_not_break_the_registry(tmp_path: Path) -> None:
    data = _tgz([_manifest(name="odd", version="1.0.0", dependencies=["not", "a", "dict"]),
                 ("package/num.json", b'{"resourceType": 5, "id": "n"}'),
                 ("package/bad.json", b"{nope"),
                 ("package/empty.json", b""),
                 ("package/dir.json/inner", b"{}"),
                 ("package/SD-ok.json", _sd("http://x/ok", "1.0.0", "ok"))])
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    pkgs = pm.resolve([pm.install_tgz(data)])
    reg = Registry(pkgs)
    assert [e["id"] for e in pkgs[0].entries] == ["ok"]
    assert reg.resolve("http://x/ok")["name"] == "ok"


def test_folder_source_symlinks_not_followed(tmp_path: Path) -> None:
    src = tmp_path / "src" / "package"
    src.mkdir(parents=True)
    (src / "package.json").write_bytes(orjson.dumps({"name": "folder.pkg", "version": "1.0.0"}))
    secret = tmp_path / "secret.json"
    secret.write_bytes(_sd("http://x/secret", "1.0.0", "secret"))
    (src / "StructureDefinition-secret.json").symlink_to(secret)
    pm = PackageManager(tmp_path / "cache", [tmp_path / "src"], registries=[])
    ref = pm.ensure(PackageRef("folder.pkg", "1.0.0"))
    assert pm.open(ref).entries == []
    assert not (pm.path_of(ref) / "StructureDefinition-secret.json").exists()
    with pytest.raises(PackageError, match=r"package\.json"):
        pm.install_path(tmp_path / "src" / "missing")


def test_bad_dependencies_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Traversal names, missing, circular, broken and other-release dependencies: warnings, not failures."""
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    pm.install_tgz(_tgz([_manifest(name="r4.dep", version="1.0.0", fhirVersions=["4.0.1"])]))
    pm.install_tgz(_tgz([_manifest(name="cyc.b", version="1.0.0", dependencies={"cyc.a": "1.0.0"})]))
    broken = tmp_path / "cache" / "broken.dep#1.0.0" / "package"
    broken.mkdir(parents=True)
    (broken / "package.json").write_bytes(b"{broken")
    top = pm.install_tgz(_tgz([_manifest(name="cyc.a", version="1.0.0", fhirVersions=["5.0.0"], dependencies={
        "../../etc": "1.0.0", "no.such.dep": "1.0.0", "cyc.b": "1.0.0", "r4.dep": "1.0.0",
        "broken.dep": "1.0.0"})]))
    with caplog.at_level(logging.WARNING, logger="dhp.packages"):
        pkgs = pm.resolve([top])
    assert [str(p.ref) for p in pkgs] == ["cyc.b#1.0.0", "cyc.a#1.0.0"]
    text = " ".join(r.message for r in caplog.records)
    assert "4.0.1" in text and "no.such.dep" in text and "invalid package name" in text
    assert "broken.dep" in text


def test_package_for_another_fhir_release_is_refused(tmp_path: Path) -> None:
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    ref = pm.install_tgz(_tgz([_manifest(name="r4.only", version="1.0.0", fhirVersions=["4.0.1"])]))
    with pytest.raises(PackageError, match="not R5"):
        pm.resolve([ref])


def test_semver_precedence_across_packages(tmp_path: Path) -> None:
    url = "http://x/StructureDefinition/dup"
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    refs = []
    for i, ver in enumerate(("1.0.0-alpha.10", "1.0.0-alpha.2", "1.0.0-alpha.9+build.1")):
        refs.append(pm.install_tgz(_tgz([_manifest(name=f"dup{i}", version="1.0.0"),
                                         ("package/sd.json", _sd(url, ver, f"v{i}"))])))
    reg = Registry(pm.resolve(refs))
    # SemVer: numeric pre-release identifiers compare as numbers (alpha.10 > alpha.9 > alpha.2)
    assert reg.resolve(url)["name"] == "v0"
    assert reg.resolve(url + "|1.0.0-alpha.2")["name"] == "v1"
    assert nearest_version("1.0.0-alpha.3", ["1.0.0-alpha.10", "1.0.0-alpha.2"]) == "1.0.0-alpha.10"


def test_older_api_copy_does_not_hide_newer_package_version(tmp_path: Path) -> None:
    url = "http://x/StructureDefinition/p"
    pm = PackageManager(tmp_path / "cache", [], registries=[])
    ref = pm.install_tgz(_tgz([_manifest(name="p", version="1.0.0"), ("package/sd.json", _sd(url, "2.0.0", "pkg"))]))
    reg = Registry(pm.resolve([ref]))
    old = {"resourceType": "StructureDefinition", "id": "o", "url": url, "version": "1.0.0", "name": "api"}
    reg.set_overlay([old], epoch=1)
    assert reg.resolve(url)["name"] == "pkg"
    assert reg.resolve(url + "|1.0.0")["name"] == "api"
    # the same version, or no version at all: the API-written copy overrides the package's
    reg.set_overlay([dict(old, version="2.0.0")], epoch=2)
    assert reg.resolve(url)["name"] == "api"
    reg.set_overlay([{k: v for k, v in old.items() if k != "version"}], epoch=3)
    assert reg.resolve(url)["name"] == "api"


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dhp.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **env}, timeout=300)


def test_cli_reports_bad_packages_without_traceback(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {"DHP_PACKAGE_CACHE": str(cache), "DHP_PACKAGE_REGISTRIES": ""}
    good = tmp_path / "good.tgz"
    good.write_bytes(_tgz([_manifest(name="good.pkg", version="1.0.0", fhirVersions=["5.0.0"])]))
    assert _cli("packages", "install", str(good), env=env).returncode == 0
    (tmp_path / "junk.tgz").write_bytes(b"junk")
    (tmp_path / "bad.tgz").write_bytes(_tgz([("package/package.json", b"{bad [/x]")]))
    (tmp_path / "evil.tgz").write_bytes(_tgz([_manifest(name="../../evil", version="1.0.0")]))
    (tmp_path / "r4.tgz").write_bytes(_tgz([_manifest(name="r4.pkg", version="1.0.0", fhirVersions=["4.0.1"])]))
    (tmp_path / "empty").mkdir()
    for arg in ("junk.tgz", "bad.tgz", "evil.tgz", "r4.tgz", "empty"):
        r = _cli("packages", "install", str(tmp_path / arg), env=env)
        assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr, (arg, r.stderr)
    assert not (tmp_path / "evil#1.0.0").exists()
    r = _cli("packages", "list", env={**env, "DHP_PACKAGES": "not a ref"})
    assert r.returncode == 1 and "DHP_PACKAGES" in r.stderr and "Traceback" not in r.stderr
    # what was installed before is still there
    assert (cache / "good.pkg#1.0.0" / "package" / "package.json").is_file()


def test_reindex_status_by_get(start_server: Callable[..., Any], tmp_path: Path) -> None:
    """The documented ``GET $reindex?mode=status`` answers; any other GET is still refused."""
    s = start_server(DHP_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", DHP_AUTH="off",
                     DHP_VALIDATION="off", DHP_PACKAGE_IMPORT="none")
    with httpx.Client(base_url=s.fhir, timeout=60) as c:
        assert c.post("/Patient/$reindex").status_code == 200
        r = c.get("/$reindex", params={"mode": "status"})
        assert r.status_code == 200, r.text
        assert r.json()["resourceType"] == "Parameters" and r.json()["parameter"]
        r = c.get("/Patient/$reindex")
        assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
        assert r.headers["allow"] == "POST"
