"""Install the loaded packages' conformance resources into the database, once per database."""

from __future__ import annotations

import logging
from collections.abc import Callable

from dhp import fhirjson
from dhp.conformance import CANONICAL_TYPES
from dhp.interactions.context import Server
from dhp.interactions.crud import ID_RE, _stamp
from dhp.store import now_us

log = logging.getLogger("dhp.packages")


async def install_packages(server: Server, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Store every package's conformance resources as ordinary resources (readable, searchable, with history).

    A (type, id) already taken — by an earlier package or by data — keeps its owner; the resource stays
    reachable by canonical URL. Returns how many resources were stored.
    """
    done = await server.store.installed_package_refs()
    total = 0
    mode = server.settings.package_import
    for pkg in server.registry.packages:
        ref = str(pkg.ref)
        if ref in done or mode == "none" or (mode == "ig" and pkg.id.startswith("hl7.")):
            continue
        items = []
        ts = now_us()
        for i, meta in enumerate(pkg.entries):
            rtype, rid = meta.get("resourceType"), meta.get("id")
            if rtype not in CANONICAL_TYPES or not isinstance(rid, str) or not ID_RE.fullmatch(rid):
                continue
            raw = (pkg.root / meta["filename"]).read_bytes()
            # Re-serialise through the decimal-preserving path so stored bytes are compact and exact.
            res = _stamp(fhirjson.loads(raw), rid, 1, ts)
            items.append((rtype, rid, fhirjson.dumps(res), None))
            if progress and i % 200 == 0:
                progress(ref, i, len(pkg.entries))
        index = server.search.index_many if server.search is not None else None
        n = await server.store.install_package(ref, items, index=index, ts=ts)
        if progress:
            progress(ref, len(pkg.entries), len(pkg.entries))
        log.info("installed %s: %d resources", ref, n)
        total += n
    return total
