"""Validation throughput, in one process after warm-up.

Prints:
- resources/s for the UZ Core Patient examples against uz-core-patient (target >= 2,000/s);
- resources/s for the hl7.fhir.r5.examples@5.0.0 resources against the base specification;
- the peer: fhir.resources parsing the same R5 resources into its pydantic models (structural checks only);
- the ceiling: a bare recursive walk over the same parsed JSON (the least any validator must do);
- a 10,000-entry transaction Bundle (target < 10 s);
- memory (RSS) after loading the five packages, and after compiling the plans used.

Run: python benchmarks/validation_bench.py [--r5-step N]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def walk(x: Any) -> int:
    if isinstance(x, dict):
        return 1 + sum(walk(v) for v in x.values())
    if isinstance(x, list):
        return sum(walk(v) for v in x)
    return 1


def rate(fn: Any, items: list[Any], min_seconds: float = 3.0) -> tuple[float, float]:
    """(items/s wall, items/s CPU) over at least min_seconds."""
    n = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        for it in items:
            fn(it)
        n += len(items)
        if time.perf_counter() - t0 >= min_seconds:
            break
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r5-step", type=int, default=1, help="use every Nth R5 example (1 = all)")
    args = ap.parse_args()

    from dhp import fhirjson
    from dhp.conformance import PackageManager, PackageRef, load_registry
    from dhp.settings import Settings
    from dhp.terminology import Terminology
    from dhp.validation import Validator

    settings = Settings.from_env()
    base_rss = rss_mb()
    t = time.perf_counter()
    registry = load_registry(settings)
    load_s = time.perf_counter() - t
    pkg_rss = rss_mb()
    print(f"packages: {', '.join(f'{p.id}#{p.version}' for p in registry.packages)}")
    print(f"load: {load_s:.2f} s; RSS {base_rss:.0f} MB before, {pkg_rss:.0f} MB after loading the packages")

    term = Terminology(registry)
    v = Validator(registry, term)
    uz = next(p for p in registry.packages if p.id == "uz.dhp.core")
    patients = [fhirjson.loads((uz.root / e["filename"]).read_bytes()) for e in uz.examples
                if e["resourceType"] == "Patient"
                and (fhirjson.loads((uz.root / e["filename"]).read_bytes()).get("meta") or {}).get("profile")]
    prof = ["https://dhp.uz/fhir/core/StructureDefinition/uz-core-patient"]
    for p in patients:  # warm-up: compile plans, fill terminology caches
        assert not [i for i in v.validate(p, prof) if i.severity in ("error", "fatal")]
    wall, cpu = rate(lambda p: v.validate(p, prof), patients)
    walk_wall, _ = rate(walk, patients)
    print(f"\nUZ Core Patient examples ({len(patients)}) vs uz-core-patient: {wall:,.0f}/s wall, {cpu:,.0f}/s CPU "
          f"(target >= 2,000/s); ceiling (bare JSON walk) {walk_wall:,.0f}/s -> {wall / walk_wall:.3f} of ceiling")

    pm = PackageManager(settings.package_cache, [], settings.registry_list)
    folder = pm.path_of(pm.ensure(PackageRef("hl7.fhir.r5.examples", "5.0.0")))
    files = sorted(f for f in folder.glob("*.json") if f.name != "package.json" and not f.name.startswith("."))
    r5 = []
    for f in files[:: args.r5_step]:
        res = fhirjson.loads(f.read_bytes())
        if isinstance(res, dict) and "resourceType" in res:
            r5.append(res)
    base_v = Validator(registry, term, default_profiles={})

    def val_r5(res: dict[str, Any]) -> int:
        return len(base_v.validate(res, ["http://hl7.org/fhir/StructureDefinition/" + res["resourceType"]]))

    for res in r5[::10]:  # warm-up on a tenth of them
        val_r5(res)
    t0, c0 = time.perf_counter(), time.process_time()
    errors_n = sum(1 for res in r5 if any(
        i.severity in ("error", "fatal")
        for i in base_v.validate(res, ["http://hl7.org/fhir/StructureDefinition/" + res["resourceType"]])))
    r5_wall = len(r5) / (time.perf_counter() - t0)
    r5_cpu = len(r5) / (time.process_time() - c0)
    print(f"\nR5 examples ({len(r5)}) vs base spec: {r5_wall:,.1f}/s wall, {r5_cpu:,.1f}/s CPU "
          f"({errors_n} with errors: spec example defects, see docs/validation.md)")
    print(f"RSS after compiling the plans used: {rss_mb():.0f} MB")

    try:
        from fhir.resources import get_fhir_model_class
    except ImportError:
        print("fhir.resources not installed: peer skipped")
        get_fhir_model_class = None
    if get_fhir_model_class is not None:
        raw = [fhirjson.fast_loads(fhirjson.dumps(r)) for r in r5]  # plain floats, as the peer expects

        def peer(res: dict[str, Any]) -> bool:
            try:
                get_fhir_model_class(res["resourceType"]).model_validate(res)
                return True
            except Exception:
                return False

        for res in raw[::10]:
            peer(res)
        t0 = time.perf_counter()
        ok = sum(1 for res in raw if peer(res))
        peer_rate = len(raw) / (time.perf_counter() - t0)
        print(f"peer fhir.resources parse of the same resources: {peer_rate:,.1f}/s ({len(raw) - ok} rejected); "
              f"ours / peer = {r5_wall / peer_rate:.2f}")
    t0 = time.perf_counter()
    for res in r5:
        walk(res)
    print(f"ceiling (bare JSON walk of the same resources): {len(r5) / (time.perf_counter() - t0):,.0f}/s")

    entries = []
    for i in range(10_000):
        body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": f"P{i}"}], "gender": "female"}
        if i:
            body["link"] = [{"other": {"reference": f"urn:uuid:00000000-0000-4000-8000-{i - 1:012d}"},
                             "type": "seealso"}]
        entries.append({"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}", "resource": body,
                        "request": {"method": "POST", "url": "Patient"}})
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    t0 = time.perf_counter()
    issues = base_v.validate(tx)
    tx_s = time.perf_counter() - t0
    print(f"\n10,000-entry transaction: {tx_s:.2f} s (target < 10 s), "
          f"{sum(1 for i in issues if i.severity == 'error')} errors")


if __name__ == "__main__":
    main()
