"""DHP settings, read from environment variables with the ``DHP_`` prefix.

Every setting is listed here with its default; README.md carries the same table.
Processes are stateless: nothing here is changed at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _default_package_path() -> str:
    """The shared DHP IG packages (beside the checkout in development and CI), then DHP's own Form 003 package."""
    here = Path(__file__).resolve()
    paths = []
    candidates = [Path.cwd() / "../shared/packages"]
    candidates += [p / "shared/packages" for p in here.parents[:5]]
    for c in candidates:
        if c.is_dir():
            paths.append(str(c.resolve()))
            break
    paths.append(str(here.parent / "documents" / "ig"))
    return ":".join(paths)


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in {"1", "true", "yes", "on"}:
        return True
    if s in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {v!r}")


DEFAULT_PACKAGES = (
    "hl7.fhir.r5.core#5.0.0,hl7.terminology.r5#7.0.1,hl7.fhir.uv.extensions.r5#5.3.0-ballot-tc1,"
    "uz.dhp.core#0.3.0,uz.dhp.integrations#0.1.0,uz.dhp.documents#0.1.0"
)


@dataclass(frozen=True)
class Settings:
    #: SQLAlchemy URL: ``sqlite+aiosqlite:///path`` (embedded default) or ``postgresql+asyncpg://…``.
    database_url: str = "sqlite+aiosqlite:///./data/dhp.db"
    #: Optional read-replica URL (PostgreSQL); reads and searches go there.
    database_read_url: str = ""
    #: Public FHIR base used in fullUrl, Location and links. Empty: derived from the request.
    base_url: str = ""
    #: ``:``-separated folders holding package ``.tgz`` files or unpacked packages.
    package_path: str = field(default_factory=_default_package_path)
    #: Comma-separated registries tried in order for ``id#version``. ``npm`` means the registry the
    #: machine's npm client is configured with; any other entry is an npm-style registry base URL.
    package_registries: str = "npm"
    #: Standard FHIR package cache (``<id>#<version>/package/``).
    package_cache: str = str(Path.home() / ".fhir" / "packages")
    #: Packages loaded at start-up (comma-separated ``id#version``).
    packages: str = DEFAULT_PACKAGES
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Seconds between a process's checks for conformance resources (profiles, SearchParameters, ValueSets…)
    #: that another process wrote; a process's own writes take effect at once.
    conformance_poll: float = 1.0
    #: Require If-Match on every update (the national platform does).
    require_if_match: bool = False
    #: Require meta.profile on every resource written.
    require_meta_profile: bool = False
    #: Profile validation on write: strict | lenient | off.
    validation: str = "strict"
    #: Auth: ``on`` (default) or ``off`` (loud warning at start-up).
    auth: str = "on"
    #: Largest ValueSet expansion without ``count``.
    max_expansion: int = 10000
    #: Default and maximum page size for history and search.
    default_count: int = 50
    max_count: int = 1000
    #: Run database migrations when the server starts.
    auto_migrate: bool = True
    #: Access-token lifetime in seconds.
    token_lifetime: int = 3600
    #: Log level for the server.
    log_level: str = "info"
    #: Which packages' conformance resources are stored in the database (readable/searchable through the
    #: API): all | ig (only non-HL7 packages) | none. Validation and terminology use every loaded package anyway.
    package_import: str = "all"
    # ---- clinical documents (dhp.documents) ----
    #: Split accepted document Bundles into atomic resources (linked back by a Provenance).
    document_split: bool = True
    #: JWKS file with the public keys trusted to sign documents (national e-signature services, signers).
    document_trusted_keys: str = ""
    #: PEM file of CA certificates: a JWS whose x5c certificate one of them issued is trusted too.
    document_trust_anchors: str = ""
    #: The platform's private signing key (JWK JSON or PEM file) used to countersign documents.
    document_signing_key: str = ""
    #: kid published for the platform key (default: the key's own kid or its thumbprint).
    document_signing_kid: str = ""
    #: Countersign every accepted document with the platform key (needs document_signing_key).
    document_countersign: bool = False
    #: (auth) JWS algorithm of access and ID tokens: RS256 (default) or ES256.
    token_alg: str = "RS256"
    #: (auth) where RSA token signatures are made: ``process`` (a child process per server process, so the
    #: event loop does not pay ~1 ms of CPU per token) or ``inline`` (on the event loop).
    token_signer: str = "process"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        for f in fields(cls):
            key = "DHP_" + f.name.upper()
            if key not in env:
                continue
            raw = env[key]
            default = f.default if f.default is not field else None  # type: ignore[comparison-overlap]
            try:
                if isinstance(default, bool):
                    values[f.name] = _bool(raw)
                elif isinstance(default, int):
                    values[f.name] = int(raw)
                elif isinstance(default, float):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError:
                raise ValueError(f"{key}={raw!r}: expected {type(default).__name__}") from None
        values.update(overrides)
        s = cls(**values)  # type: ignore[arg-type]
        if s.validation not in {"strict", "lenient", "off"}:
            raise ValueError("DHP_VALIDATION must be strict, lenient or off")
        if s.auth not in {"on", "off"}:
            raise ValueError("DHP_AUTH must be on or off")
        if not s.conformance_poll >= 0:  # NaN too
            raise ValueError("DHP_CONFORMANCE_POLL must be a number of seconds >= 0")
        return s

    @property
    def package_paths(self) -> list[Path]:
        return [Path(p) for p in self.package_path.split(":") if p.strip()]

    @property
    def package_list(self) -> list[str]:
        return [p.strip() for p in self.packages.split(",") if p.strip()]

    @property
    def registry_list(self) -> list[str]:
        return [r.strip() for r in self.package_registries.split(",") if r.strip()]
