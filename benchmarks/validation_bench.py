"""Validation throughput, in one process after warm-up.

Prints:
- resources/s for the UZ Core Patient examples against uz-core-patient (target >= 2,000/s), looped, and as
  3,000 variants with unique names/identifier values (one pass: no format-cache hits for those);
- resources/s for the hl7.fhir.r5.examples@5.0.0 resources against the base specification;
- the peer: fhir.resources parsing the same R5 resources into its pydantic models (structural checks only);
- the ceiling: a bare recursive walk over the same parsed JSON (the least any validator must do);
- a 10,000-entry transaction Bundle (target < 10 s);
- memory (RSS) after loading the five packages, and after compiling the plans used.

Run: python benchmarks/validation_bench.py [--r5-step N]
"""

from __future__ import annotations

import argparse
import copy
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


def rate(fn: Any, items: list[Any], min_seconds: float = 3.0) -> tuple[float, float, float, float]:
    """(items/s wall, items/s CPU, best-round wall, best-round CPU) over at least min_seconds.

    The machine is shared (load average 4-5 on 2 cores while other work runs): wall time includes waiting for
    a core, and even CPU time inflates under contention. The mean over all rounds is the figure; the best
    round (~0.3 s each) shows what one uncontended core does.
    """
    n = 0
    best_wall = best_cpu = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    while True:
        m = 0
        t1, c1 = time.perf_counter(), time.process_time()
        while time.perf_counter() - t1 < 0.3:
            for it in items:
                fn(it)
            m += len(items)
        n += m
        best_wall = max(best_wall, m / (time.perf_counter() - t1))
        best_cpu = max(best_cpu, m / max(time.process_time() - c1, 1e-9))
        if time.perf_counter() - t0 >= min_seconds:
            break
    return (n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9), best_wall, best_cpu)


def once(fn: Any, items: list[Any]) -> tuple[float, float]:
    """(items/s wall, items/s CPU) for one pass over items."""
    t0, c0 = time.perf_counter(), time.process_time()
    for it in items:
        fn(it)
    return len(items) / (time.perf_counter() - t0), len(items) / max(time.process_time() - c0, 1e-9)


def _unique_strings(x: Any, i: int) -> Any:
    """Make the free-text values of a Patient (names, identifier values, address lines) unique to variant i."""
    if isinstance(x, dict):
        for k, val in x.items():
            if k in ("text", "family", "given", "line") or (k == "value" and isinstance(val, str)):
                if isinstance(val, list):
                    x[k] = [f"{s} {i}" if isinstance(s, str) else s for s in val]
                elif isinstance(val, str):
                    x[k] = f"{val}{i}"
                else:
                    _unique_strings(val, i)
            else:
                _unique_strings(val, i)
    elif isinstance(x, list):
        for val in x:
            _unique_strings(val, i)
    return x


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
    wall, cpu, best_wall, best_cpu = rate(lambda p: v.validate(p, prof), patients, 6.0)
    walk_wall, walk_cpu, _, _ = rate(walk, patients)
    print(f"\nUZ Core Patient examples ({len(patients)}) vs uz-core-patient (target >= 2,000/s):\n"
          f"  mean {wall:,.0f}/s wall, {cpu:,.0f}/s CPU; best 0.3-s round {best_wall:,.0f}/s wall, "
          f"{best_cpu:,.0f}/s CPU\n"
          f"  ceiling (bare JSON walk) {walk_wall:,.0f}/s wall, {walk_cpu:,.0f}/s CPU -> "
          f"{cpu / walk_cpu:.3f} of ceiling (CPU)")

    # The loop above repeats 3 Patients, so every string is already in the format cache. Real traffic has new
    # names and identifiers in every resource: 3,000 variants with unique text values, validated once each.
    variants = [_unique_strings(copy.deepcopy(patients[i % len(patients)]), i) for i in range(3000)]
    assert not [i for i in v.validate(variants[-1], prof) if i.severity in ("error", "fatal")]
    u_wall, u_cpu = once(lambda p: v.validate(p, prof), variants)
    print(f"  the same with unique names/identifiers ({len(variants):,} variants, one pass each): "
          f"{u_wall:,.0f}/s wall, {u_cpu:,.0f}/s CPU")

    pm = PackageManager(settings.package_cache, [], settings.registry_list)
    folder = pm.path_of(pm.ensure(PackageRef("hl7.fhir.r5.examples", "5.0.0")))
    files = sorted(f for f in folder.glob("*.json") if f.name != "package.json" and not f.name.startswith("."))
    r5 = []
    for f in files[:: args.r5_step]:
        res = fhirjson.loads(f.read_bytes())
        if isinstance(res, dict) and "resourceType" in res:
            r5.append(res)
    base_v = Validator(registry, term, default_profiles={})

    with_errors: set[int] = set()

    def val_r5(res: dict[str, Any]) -> None:
        issues = base_v.validate(res, ["http://hl7.org/fhir/StructureDefinition/" + res["resourceType"]])
        if any(i.severity in ("error", "fatal") for i in issues):
            with_errors.add(id(res))

    for res in r5[::10]:  # warm-up on a tenth of them
        val_r5(res)
    with_errors.clear()
    r5_wall, r5_cpu = once(val_r5, r5)
    errors_n = len(with_errors)
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
        rejected: set[int] = set()

        def peer(res: dict[str, Any]) -> None:
            try:
                get_fhir_model_class(res["resourceType"]).model_validate(res)
            except Exception:
                rejected.add(id(res))

        for res in raw[::10]:
            peer(res)
        rejected.clear()
        # Interleaved in chunks of 50 resources, so that both see the same machine load (it varies by 2x
        # within a minute here).
        ours_w = ours_c = peer_w = peer_c = 0.0
        for k in range(0, len(r5), 50):
            t0, c0 = time.perf_counter(), time.process_time()
            for res in r5[k:k + 50]:
                val_r5(res)
            t1, c1 = time.perf_counter(), time.process_time()
            for res in raw[k:k + 50]:
                peer(res)
            t2, c2 = time.perf_counter(), time.process_time()
            ours_w, ours_c = ours_w + t1 - t0, ours_c + c1 - c0
            peer_w, peer_c = peer_w + t2 - t1, peer_c + c2 - c1
        n = len(r5)
        print(f"interleaved with the peer: ours {n / ours_w:,.1f}/s wall, {n / ours_c:,.1f}/s CPU; "
              f"peer fhir.resources parse {n / peer_w:,.1f}/s wall, {n / peer_c:,.1f}/s CPU "
              f"({len(rejected)} rejected)\n"
              f"ours / peer = {peer_w / ours_w:.2f} (wall), {peer_c / ours_c:.2f} (CPU)")
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
