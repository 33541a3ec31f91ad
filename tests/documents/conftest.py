"""A DHP server per backend with the document package loaded, strict validation and configured keys."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey

from dhp.documents.igbuild import PACKAGE_ID, PACKAGE_VERSION
from dhp.settings import DEFAULT_PACKAGES, Settings

IG = Path(__file__).resolve().parents[2] / "src" / "dhp" / "documents" / "ig"
FJ = "application/fhir+json"


def document_env(db_url: str, keys: dict[str, Any]) -> dict[str, str]:
    return {"DHP_DATABASE_URL": db_url, "DHP_AUTH": "off", "DHP_VALIDATION": "strict",
            "DHP_PACKAGE_IMPORT": "ig",
            "DHP_PACKAGE_PATH": f"{Settings().package_path}:{IG}",
            "DHP_PACKAGES": f"{DEFAULT_PACKAGES},{PACKAGE_ID}#{PACKAGE_VERSION}",
            "DHP_DOCUMENT_TRUSTED_KEYS": str(keys["trusted"]),
            "DHP_DOCUMENT_SIGNING_KEY": str(keys["platform"]), "DHP_DOCUMENT_SIGNING_KID": "dhp-platform-test"}


@pytest.fixture(scope="session")
def doc_keys(tmp_root: Path) -> dict[str, Any]:
    """A signer's key pair (trusted via the JWKS file) and the platform key, written as configuration files."""
    signer = ECKey.generate_key("P-256", parameters={"kid": "signer-1"}, private=True)
    stranger = ECKey.generate_key("P-256", parameters={"kid": "stranger"}, private=True)
    platform = ECKey.generate_key("P-256", private=True)
    d = tmp_root / "doc-keys"
    d.mkdir(exist_ok=True)
    (d / "trusted.json").write_text(json.dumps({"keys": [signer.as_dict(private=False)]}))
    (d / "platform.json").write_text(json.dumps(platform.as_dict(private=True)))
    return {"trusted": d / "trusted.json", "platform": d / "platform.json", "signer": signer, "stranger": stranger}


@pytest.fixture(scope="session", params=["sqlite", "pg"])
def doc_server(request: pytest.FixtureRequest, start_server: Callable[..., Any], new_db_url: Callable[[str], str],
               doc_keys: dict[str, Any]) -> Any:
    return start_server(**document_env(new_db_url(request.param), doc_keys))


@pytest.fixture(scope="module")
def client(doc_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=doc_server.fhir, headers={"Content-Type": FJ, "Accept": FJ}, timeout=120) as c:
        yield c
