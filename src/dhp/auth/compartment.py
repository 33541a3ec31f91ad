"""Resource-level checks for patient/ scopes and granular (query-restricted) scopes.

Patient compartment membership comes from the R5 CompartmentDefinition ``Patient``: for a resource type it
names search parameters whose values link a resource to a patient. Their FHIRPath expressions are compiled
once (fhirpathpy) and cached per resource type; the cache is dropped when the registry overlay changes.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import fhirpathpy
from fhirpathpy.models import models as fhirpath_models

from dhp.auth.scopes import Principal, ResourceScope
from dhp.errors import FHIRError

COMPARTMENT_URL = "http://hl7.org/fhir/CompartmentDefinition/patient"

# fhirpathpy has no resolve(): `X.where(resolve() is Patient)` becomes `X`, and the reference text is
# checked for the target type instead.
_RESOLVE_IS = re.compile(r"\.where\(\s*resolve\(\)\s+is\s+[A-Za-z]+\s*\)")

Evaluator = Callable[[dict[str, Any]], list[Any]]


class Compartments:
    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._params: dict[str, list[str]] | None = None  # resource type → compartment params
        self._sp: dict[tuple[str, str], dict[str, Any]] | None = None  # (base, code) → SearchParameter
        self._compiled: dict[tuple[str, str], Evaluator | None] = {}
        listeners = getattr(registry, "listeners", None)
        if isinstance(listeners, list):
            listeners.append(self.clear)

    def clear(self, *_: Any) -> None:
        with self._lock:
            self._params = None
            self._sp = None
            self._compiled = {}

    def _load(self) -> None:
        cd = self.registry.resolve(COMPARTMENT_URL)
        params: dict[str, list[str]] = {}
        for r in (cd or {}).get("resource", []):
            params[r["code"]] = list(r.get("param") or [])
        sp: dict[tuple[str, str], dict[str, Any]] = {}
        for p in self.registry.all("SearchParameter"):
            for base in p.get("base") or []:
                sp.setdefault((base, p.get("code", "")), p)
        for base, code in [("Resource", "_id")]:
            sp.setdefault((base, code), {"code": "_id", "type": "token", "expression": "Resource.id"})
        self._params, self._sp = params, sp

    def params(self, rtype: str) -> list[str] | None:
        """Compartment params for ``rtype``; None when the type is not in the Patient compartment."""
        if self._params is None:
            with self._lock:
                if self._params is None:
                    self._load()
        assert self._params is not None
        if rtype == "Patient":
            return ["_self"]
        ps = self._params.get(rtype)
        return ps or None

    def search_param(self, rtype: str, code: str) -> dict[str, Any] | None:
        if self._sp is None:
            self.params(rtype)
        assert self._sp is not None
        return self._sp.get((rtype, code)) or self._sp.get(("Resource", code)) \
            or self._sp.get(("DomainResource", code))

    def evaluator(self, rtype: str, code: str) -> Evaluator | None:
        key = (rtype, code)
        if key in self._compiled:
            return self._compiled[key]
        sp = self.search_param(rtype, code)
        fn: Evaluator | None = None
        expr = (sp or {}).get("expression")
        if expr:
            expr = _RESOLVE_IS.sub("", expr)
            try:
                compiled = fhirpathpy.compile(expr, fhirpath_models["r5"])
            except Exception:  # an expression fhirpathpy cannot parse: the parameter cannot match
                compiled = None
            if compiled is not None:
                def fn(resource: dict[str, Any], _c: Any = compiled) -> list[Any]:
                    try:
                        return list(_c(resource))
                    except Exception:
                        return []
        self._compiled[key] = fn
        return fn

    def in_compartment(self, resource: dict[str, Any], patient_id: str) -> bool | None:
        """Is ``resource`` in Patient/``patient_id``'s compartment? None: the type has no compartment."""
        rtype = resource.get("resourceType", "")
        params = self.params(rtype)
        if params is None:
            return None
        if params == ["_self"]:
            return resource.get("id") == patient_id
        for code in params:
            fn = self.evaluator(rtype, code)
            if fn is None:
                continue
            for v in fn(resource):
                if isinstance(v, dict) and _is_patient_ref(v.get("reference"), patient_id):
                    return True
        return False

    def matches(self, resource: dict[str, Any], query: tuple[tuple[str, str], ...]) -> bool:
        """Does ``resource`` satisfy every (param, value) pair of a granular scope?"""
        rtype = resource.get("resourceType", "")
        for name, value in query:
            code, _, modifier = name.partition(":")
            sp = self.search_param(rtype, code)
            fn = self.evaluator(rtype, code)
            if sp is None or fn is None:
                return False
            values = fn(resource)
            kind = sp.get("type")
            alternatives = value.split(",")
            if kind == "token":
                ok = any(_token_match(v, a) for v in values for a in alternatives)
            elif kind == "reference":
                ok = any(_ref_match(v, a) for v in values for a in alternatives)
            elif kind in ("string", "uri"):
                ok = any(isinstance(v, str) and (v == a if modifier == "exact" or kind == "uri"
                                                 else v.lower().startswith(a.lower()))
                         for v in values for a in alternatives)
            else:
                return False
            if not ok:
                return False
        return True


def _is_patient_ref(ref: Any, patient_id: str) -> bool:
    if not isinstance(ref, str):
        return False
    ref = ref.split("/_history/")[0]
    return ref == f"Patient/{patient_id}" or ref.endswith(f"/Patient/{patient_id}")


def _token_match(v: Any, want: str) -> bool:
    system, bar, code = want.rpartition("|")
    has_system = bool(bar)
    if isinstance(v, dict):
        codings = v.get("coding") if "coding" in v else [v]
        for c in codings or []:
            if not isinstance(c, dict):
                continue
            cv = c.get("code", c.get("value"))
            cs = c.get("system")
            if code and cv != code:
                continue
            if has_system and (cs or "") != system:
                continue
            if not code and not has_system:
                continue
            return True
        return False
    if isinstance(v, bool):
        return (not has_system) and code == ("true" if v else "false")
    return (not has_system or not system) and str(v) == code


def _ref_match(v: Any, want: str) -> bool:
    if not isinstance(v, dict):
        return isinstance(v, str) and v == want
    ref = v.get("reference")
    if not isinstance(ref, str):
        return False
    ref = ref.split("/_history/")[0]
    return ref == want or ref.endswith("/" + want) or ("/" not in want and ref.rsplit("/", 1)[-1] == want)


def _compartments(server: Any) -> Compartments:
    state = server.auth
    if state is None or getattr(state, "compartments", None) is None:
        comps = Compartments(server.registry)
        if state is not None:
            state.compartments = comps
        return comps
    return state.compartments  # type: ignore[no-any-return]


def _scope_allows(comps: Compartments, principal: Principal, r: ResourceScope, resource: dict[str, Any],
                  interaction: str) -> bool:
    if r.context == "patient":
        if not principal.patient:
            return False
        inside = comps.in_compartment(resource, principal.patient)
        if inside is None:
            # Not patient data (Medication, Organization, …): readable, never writable through patient/.
            if interaction not in ("r", "s"):
                return False
        elif not inside:
            return False
    return not r.query or comps.matches(resource, r.query)


def check_resource(server: Any, principal: Principal, interaction: str, resource: dict[str, Any]) -> None:
    """Raise a 403 unless some scope of ``principal`` allows ``interaction`` on this very resource."""
    rtype = resource.get("resourceType", "")
    scopes = principal.scopes_for(interaction, rtype)
    if not scopes:
        raise FHIRError(403, f"the token's scopes do not allow '{interaction}' on {rtype}", "forbidden",
                        message_id="auth-insufficient-scope")
    if any(r.context != "patient" and not r.query for r in scopes):
        return
    comps = _compartments(server)
    if any(_scope_allows(comps, principal, r, resource, interaction) for r in scopes):
        return
    what = f"{rtype}/{resource.get('id')}" if resource.get("id") else rtype
    raise FHIRError(403, f"{what} is outside what the token's scopes allow (patient compartment or "
                         "scope query)", "forbidden", message_id="auth-outside-scope")
