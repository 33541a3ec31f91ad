"""FHIR NPM packages: find them (local files and folders, the cache, registries), unpack them into the
standard cache layout, resolve dependencies, and index their resources.

A package lives at ``<cache>/<id>#<version>/package/``. Each one gets a small index file
(``.dhp-index.json``) on first load, so later start-ups read one file per package, not thousands.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import orjson

log = logging.getLogger("dhp.packages")

INDEX_FILE = ".dhp-index.json"
# The FHIR release this server implements; packages declaring only other releases are refused.
FHIR_RELEASE = "5."
INDEX_VERSION = 3
# Fields kept in the index for every resource file.
_INDEX_FIELDS = (
    "resourceType", "id", "url", "version", "name", "status", "kind", "type", "derivation",
    "baseDefinition", "abstract", "supplements", "content",
)


# Largest total unpacked size of one package archive: guards the cache against decompression bombs.
MAX_UNPACKED_BYTES = 2 * 1024 ** 3
# Package ids and versions become folder names in the cache: no separators, no leading dot.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class PackageError(Exception):
    """A package could not be found, fetched or read."""


@dataclass(frozen=True, order=True)
class PackageRef:
    id: str
    version: str

    @classmethod
    def parse(cls, text: str) -> PackageRef:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*[#@]\s*([A-Za-z0-9._+-]+)\s*", text)
        if not m:
            raise PackageError(f"not a package reference (expected id#version): {text!r}")
        return cls(m.group(1), m.group(2))

    def __str__(self) -> str:
        return f"{self.id}#{self.version}"

    @classmethod
    def checked(cls, pid: Any, version: Any, where: str = "package") -> PackageRef:
        """A ref from untrusted text (a manifest, a dependency list); refuses names that are not safe folder names."""
        if not isinstance(pid, str) or not _ID_RE.fullmatch(pid) or len(pid) > 200:
            raise PackageError(f"{where}: invalid package name {pid!r}")
        if not isinstance(version, str) or not _VERSION_RE.fullmatch(version) or len(version) > 100:
            raise PackageError(f"{where}: invalid version {version!r} of package {pid}")
        return cls(pid, version)


def manifest_ref(manifest: Any, where: str) -> PackageRef:
    """The id#version a package.json declares, validated."""
    if not isinstance(manifest, dict):
        raise PackageError(f"{where}: package.json is not a JSON object")
    if not manifest.get("name") or not manifest.get("version"):
        raise PackageError(f"{where}: package.json lacks name or version")
    return PackageRef.checked(manifest["name"], manifest["version"], where)


def _load_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise PackageError(f"{where}: package.json is not valid JSON: {e}") from None
    manifest_ref(manifest, where)
    return manifest


@dataclass
class Package:
    id: str
    version: str
    root: Path  # the folder that holds package.json and the resource files
    manifest: dict[str, Any]
    entries: list[dict[str, Any]] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ref(self) -> PackageRef:
        return PackageRef(self.id, self.version)

    @property
    def canonical(self) -> str:
        return str(self.manifest.get("canonical") or self.manifest.get("url") or "")

    @property
    def dependencies(self) -> dict[str, str]:
        deps = self.manifest.get("dependencies") or {}
        if not isinstance(deps, dict):
            log.warning("%s: ignoring malformed dependencies %r", self.ref, deps)
            return {}
        return {str(k): str(v) for k, v in deps.items()}

    def fhir_versions(self) -> list[str]:
        """The FHIR versions the manifest declares (``fhirVersions``, or the older ``fhir-version-list``)."""
        raw = self.manifest.get("fhirVersions", self.manifest.get("fhir-version-list"))
        if isinstance(raw, str):
            raw = [raw]
        return [v for v in raw if isinstance(v, str)] if isinstance(raw, list) else []

    def read(self, entry: dict[str, Any]) -> dict[str, Any]:
        return orjson.loads((self.root / entry["filename"]).read_bytes())

    def iter_resources(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for e in self.entries:
            yield e, self.read(e)


# ---------------------------------------------------------------- versions


def _version_key(v: str) -> tuple[Any, ...]:
    """Sort key following SemVer 2.0 precedence (build metadata ignored, pre-releases before the release,
    pre-release identifiers compared numerically when numeric); tolerant of non-SemVer versions."""
    main, _, pre = v.split("+", 1)[0].partition("-")
    nums: list[int] = []
    for part in main.split("."):
        m = re.match(r"\d+", part)
        nums.append(int(m.group(0)) if m else 0)
    while len(nums) < 3:
        nums.append(0)
    # Numeric identifiers sort before alphanumeric ones; a shorter list of equal identifiers sorts first.
    pre_key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    # A release sorts after its pre-releases.
    return (tuple(nums), 0 if pre else 1, pre_key)


def nearest_version(wanted: str, available: Iterable[str]) -> str | None:
    """The available version nearest to ``wanted``: exact, else the lowest later one, else the highest."""
    avail = sorted(set(available), key=_version_key)
    if not avail:
        return None
    if wanted in avail:
        return wanted
    if wanted in ("latest", "current", "dev"):
        return avail[-1]
    wk = _version_key(wanted)
    later = [v for v in avail if _version_key(v) > wk]
    return later[0] if later else avail[-1]


# ---------------------------------------------------------------- unpacking and indexing


def _member_name(raw: str) -> str:
    """A member name with separators normalised and leading ``./`` removed (``./package/x`` is ``package/x``)."""
    name = raw.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _open_tar(data: bytes) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PackageError(f"not a readable package archive (.tgz): {e}") from None


def _safe_extract(data: bytes, dest: Path) -> None:
    """Unpack a package tarball into ``dest`` (which gets ``package/``), refusing unsafe members."""
    try:
        with _open_tar(data) as tar:
            members = []
            total = 0
            for m in tar.getmembers():
                name = _member_name(m.name)
                if name.startswith("/") or re.match(r"[A-Za-z]:", name) or ".." in name.split("/"):
                    raise PackageError(f"unsafe path in package archive: {m.name}")
                # Links, devices and fifos have no place in a package: skipped, never followed.
                if not (m.isfile() or m.isdir()):
                    continue
                total += m.size
                if total > MAX_UNPACKED_BYTES:
                    raise PackageError(f"package archive unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                # Some packages put files at the top level instead of under package/.
                m.name = name if name.startswith("package/") or name == "package" else "package/" + name
                members.append(m)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise PackageError(f"cannot unpack package archive: {e}") from None


def read_manifest_from_tgz(data: bytes) -> dict[str, Any]:
    """The archive's package.json (validated: an object with a safe name and version)."""
    try:
        with _open_tar(data) as tar:
            for m in tar.getmembers():
                if m.isfile() and _member_name(m.name) in ("package/package.json", "package.json"):
                    f = tar.extractfile(m)
                    if f is not None:
                        return _load_manifest(f.read(), "archive")
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise PackageError(f"cannot read package archive: {e}") from None
    raise PackageError("archive has no package/package.json")


def _index_folder(folder: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    if not folder.is_dir():
        return entries
    for p in sorted(folder.iterdir()):
        if p.suffix != ".json" or p.name in ("package.json", "package-lock.json") or p.name.startswith("."):
            continue
        # Only regular files: a symlink could point anywhere on the machine, a directory cannot be read.
        if p.is_symlink() or not p.is_file():
            continue
        try:
            res = orjson.loads(p.read_bytes())
        except (orjson.JSONDecodeError, OSError) as e:
            log.warning("skipping %s: not valid JSON (%s)", p, e)
            continue
        # The registry files entries by resourceType: one that is not a string cannot be looked up.
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            continue
        e: dict[str, Any] = {"filename": str(p.relative_to(folder.parent if folder.name == "example" else folder))}
        for k in _INDEX_FIELDS:
            if k in res and isinstance(res[k], str | bool):
                e[k] = res[k]
        entries.append(e)
    return entries


def open_package(root: Path) -> Package:
    """Open an unpacked package folder (the one holding package.json), building its index if needed."""
    manifest_path = root / "package.json"
    if not manifest_path.is_file():
        raise PackageError(f"{root} has no package.json")
    try:
        manifest = _load_manifest(manifest_path.read_bytes(), str(manifest_path))
    except OSError as e:
        raise PackageError(f"cannot read {manifest_path}: {e}") from None
    pid, ver = manifest["name"], manifest["version"]
    index_path = root / INDEX_FILE
    index: dict[str, Any] | None = None
    if index_path.is_file():
        try:
            index = orjson.loads(index_path.read_bytes())
            # A damaged index is rebuilt rather than trusted.
            if (not isinstance(index, dict) or index.get("version") != INDEX_VERSION
                    or not isinstance(index.get("resources"), list) or not isinstance(index.get("examples"), list)):
                index = None
        except (orjson.JSONDecodeError, OSError):
            index = None
    if index is None:
        index = {
            "version": INDEX_VERSION,
            "resources": _index_folder(root),
            "examples": [dict(e, filename="example/" + e["filename"].split("/")[-1])
                         for e in _index_folder(root / "example")],
        }
        try:
            tmp = index_path.with_suffix(".tmp")
            tmp.write_bytes(orjson.dumps(index))
            os.replace(tmp, index_path)
        except OSError:
            log.debug("cannot write package index in %s", root)
    return Package(str(pid), str(ver), root, manifest, index["resources"], index["examples"])


def _tree_differs(src: Path, cached: Path) -> bool:
    """True when a source folder's files differ (by size or content time) from its cached copy."""
    for p in src.rglob("*"):
        if not p.is_file() or p.name == INDEX_FILE:
            continue
        q = cached / p.relative_to(src)
        if not q.is_file() or q.stat().st_size != p.stat().st_size or q.stat().st_mtime < p.stat().st_mtime:
            return True
    return False


# ---------------------------------------------------------------- sources


@cache
def _npm_registry_url() -> str | None:
    url = os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")
    if url:
        return url
    try:
        out = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True,
                             timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("http"):
            return line
    return None


def _registry_base(name: str) -> str | None:
    if name == "npm":
        return _npm_registry_url()
    if name.startswith(("http://", "https://")):
        return name
    log.warning("ignoring unknown package registry %r", name)
    return None


class PackageManager:
    """Finds and installs packages into the cache; opens installed ones."""

    def __init__(self, cache_dir: Path | str, local_paths: Iterable[Path | str] = (),
                 registries: Iterable[str] = ("npm",), timeout: float = 120.0) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.local_paths = [Path(p).expanduser() for p in local_paths]
        self.registries = list(registries)
        self.timeout = timeout
        self._local: dict[PackageRef, Path] | None = None
        self._registry_versions: dict[str, dict[str, str]] = {}

    # -- what is where

    def cached(self) -> list[PackageRef]:
        out = []
        if self.cache_dir.is_dir():
            for d in self.cache_dir.iterdir():
                if "#" in d.name and (d / "package" / "package.json").is_file():
                    pid, _, ver = d.name.partition("#")
                    out.append(PackageRef(pid, ver))
        return sorted(out)

    def local(self) -> dict[PackageRef, Path]:
        """Packages found in the local folders: ``.tgz`` files and unpacked folders."""
        if self._local is not None:
            return self._local
        found: dict[PackageRef, Path] = {}
        for base in self.local_paths:
            if not base.exists():
                continue
            is_package = base.is_file() or (base / "package" / "package.json").is_file() \
                or (base / "package.json").is_file()
            candidates = [base] if is_package else sorted(base.iterdir())
            for p in candidates:
                try:
                    if p.is_file() and p.name.endswith((".tgz", ".tar.gz")):
                        m = read_manifest_from_tgz(p.read_bytes())
                    elif p.is_dir() and (p / "package" / "package.json").is_file():
                        m = _load_manifest((p / "package" / "package.json").read_bytes(), str(p))
                    elif p.is_dir() and (p / "package.json").is_file():
                        m = _load_manifest((p / "package.json").read_bytes(), str(p))
                    else:
                        continue
                except (PackageError, OSError) as e:
                    log.warning("skipping %s: %s", p, e)
                    continue
                found.setdefault(manifest_ref(m, str(p)), p)
        self._local = found
        return found

    def path_of(self, ref: PackageRef) -> Path:
        return self.cache_dir / f"{ref.id}#{ref.version}" / "package"

    def _registry_info(self, pid: str) -> dict[str, str]:
        """version → tarball URL, over all registries (first registry wins per version)."""
        if pid in self._registry_versions:
            return self._registry_versions[pid]
        versions: dict[str, str] = {}
        for reg in self.registries:
            base = _registry_base(reg)
            if not base:
                continue
            url = base.rstrip("/") + "/" + pid
            try:
                r = httpx.get(url, timeout=self.timeout, follow_redirects=True,
                              headers={"Accept": "application/json"})
            except httpx.HTTPError as e:
                log.warning("package registry %s unreachable: %s", base, e)
                continue
            if r.status_code != 200:
                continue
            try:
                doc = r.json()
            except ValueError:
                continue
            for ver, info in (doc.get("versions") or {}).items():
                tarball = ((info or {}).get("dist") or {}).get("tarball") or f"{url}/{ver}"
                versions.setdefault(str(ver), str(tarball))
        self._registry_versions[pid] = versions
        return versions

    def available_versions(self, pid: str, remote: bool = True) -> set[str]:
        vers = {r.version for r in self.cached() if r.id == pid}
        vers |= {r.version for r in self.local() if r.id == pid}
        if remote:
            vers |= set(self._registry_info(pid))
        return vers

    # -- installing

    def install_tgz(self, data: bytes) -> PackageRef:
        manifest = read_manifest_from_tgz(data)
        ref = manifest_ref(manifest, "archive")
        dest = self.cache_dir / f"{ref.id}#{ref.version}"
        if (dest / "package" / "package.json").is_file():
            return ref
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=self.cache_dir))
        try:
            _safe_extract(data, tmp)
            # The manifest must be where the cache layout expects it, and name the same package.
            try:
                unpacked = _load_manifest((tmp / "package" / "package.json").read_bytes(), "archive")
            except OSError:
                raise PackageError("archive has no package/package.json") from None
            if manifest_ref(unpacked, "archive") != ref:
                raise PackageError("archive holds more than one package.json")
            # A half-installed folder (no package.json) from an earlier crash would block the rename.
            if dest.is_dir() and not (dest / "package" / "package.json").is_file():
                shutil.rmtree(dest, ignore_errors=True)
            try:
                os.rename(tmp, dest)
            except OSError:
                # Another process installed it meanwhile.
                if not (dest / "package" / "package.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return ref

    def install_path(self, path: Path, refresh: bool = False) -> PackageRef:
        path = Path(path)
        try:
            if path.is_file():
                return self.install_tgz(path.read_bytes())
            root = path / "package" if (path / "package" / "package.json").is_file() else path
            if not (root / "package.json").is_file():
                raise PackageError(f"{path} is neither a package archive nor a folder with package.json")
            ref = manifest_ref(_load_manifest((root / "package.json").read_bytes(), str(root)), str(root))
            dest = self.cache_dir / f"{ref.id}#{ref.version}"
            if (dest / "package" / "package.json").is_file() and not (refresh and _tree_differs(root, dest / "package")):
                return ref
            # Copy beside the cache entry and swap it in only when complete: a failed copy must not lose
            # the copy already installed. Symlinks are not followed (they could point anywhere).
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".install-", dir=self.cache_dir))
            try:
                shutil.copytree(root, tmp / "package", symlinks=True,
                                ignore=lambda d, names: [n for n in names if (Path(d) / n).is_symlink()])
                old = None
                if dest.exists():
                    old = Path(tempfile.mkdtemp(prefix=".old-", dir=self.cache_dir))
                    os.rename(dest, old / "x")
                try:
                    os.rename(tmp, dest)
                except OSError:
                    # Another process installed it meanwhile.
                    if not (dest / "package" / "package.json").is_file():
                        raise
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            return ref
        except OSError as e:
            raise PackageError(f"cannot install {path}: {e}") from None

    def ensure(self, ref: PackageRef) -> PackageRef:
        """Make ``ref`` (or the nearest available version) present in the cache; return what was installed."""
        local = self.local()
        if ref in local and local[ref].is_dir():
            # An unpacked source folder may be edited in place (a package being authored): copy it afresh.
            return self.install_path(local[ref], refresh=True)
        if (self.path_of(ref) / "package.json").is_file():
            return ref
        if ref in local:
            return self.install_path(local[ref])
        remote = self._registry_info(ref.id)
        if ref.version in remote:
            return self.install_tgz(self._download(remote[ref.version]))
        choice = nearest_version(ref.version, self.available_versions(ref.id))
        if choice is None:
            raise PackageError(f"package {ref} not found in {self.local_paths or 'no local folders'}, "
                               f"the cache or registries {self.registries}")
        log.warning("package %s is not available; using %s#%s instead", ref, ref.id, choice)
        return self.ensure(PackageRef(ref.id, choice))

    def _download(self, url: str) -> bytes:
        try:
            r = httpx.get(url, timeout=self.timeout, follow_redirects=True)
        except httpx.HTTPError as e:
            raise PackageError(f"download failed: {url}: {e}") from None
        if r.status_code != 200:
            raise PackageError(f"download failed: {url}: HTTP {r.status_code}")
        return r.content

    def open(self, ref: PackageRef) -> Package:
        return open_package(self.path_of(ref))

    def resolve(self, wanted: Iterable[PackageRef | str]) -> list[Package]:
        """Install the wanted packages and their dependencies; one version per package id.

        Explicitly wanted versions win over dependency versions. Dependencies are loaded before
        the packages that need them.
        """
        refs = [PackageRef.parse(w) if isinstance(w, str) else w for w in wanted]
        chosen: dict[str, PackageRef] = {}
        for r in refs:
            chosen[r.id] = self.ensure(r)
        wanted_ids = {r.id for r in refs}
        order: list[str] = []
        visiting: set[str] = set()
        opened: dict[str, Package] = {}

        def visit(pid: str) -> None:
            if pid in opened or pid in visiting:
                return
            visiting.add(pid)
            try:
                pkg = self.open(chosen[pid])
                # A package for another FHIR release would put, say, R4 definitions under the same canonical URLs.
                fv = pkg.fhir_versions()
                if fv and not any(v.startswith(FHIR_RELEASE) for v in fv):
                    raise PackageError(f"package {pkg.ref} is for FHIR {', '.join(fv)}, not R5 ({FHIR_RELEASE}x)")
            except PackageError as e:
                if pid in wanted_ids:
                    raise
                # A broken or foreign dependency must not stop the packages that were asked for.
                log.warning("dependency skipped: %s", e)
                del chosen[pid]
                return
            for dep_id, dep_ver in pkg.dependencies.items():
                if dep_id in visiting and dep_id not in chosen:
                    continue  # refused above
                if dep_id not in chosen:
                    try:
                        # Dependency names come from an untrusted manifest and become cache folder names.
                        chosen[dep_id] = self.ensure(PackageRef.checked(dep_id, dep_ver, f"dependency of {pkg.ref}"))
                    except PackageError as e:
                        log.warning("dependency %s#%s of %s skipped: %s", dep_id, dep_ver, pkg.ref, e)
                        continue
                elif chosen[dep_id].version != dep_ver:
                    log.warning("%s wants %s#%s; using %s", pkg.ref, dep_id, dep_ver, chosen[dep_id])
                visit(dep_id)
            opened[pid] = pkg
            order.append(pid)

        for r in refs:
            visit(r.id)
        return [opened[p] for p in order]
