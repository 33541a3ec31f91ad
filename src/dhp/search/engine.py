"""The search engine: parameter registry, index extraction and the write hooks the interactions call."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import logging
import math
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson

from dhp import fhirjson
from dhp.conformance import Registry
from dhp.errors import FHIRError, Issue
from dhp.search import shared
from dhp.search.compiled import Run, compile_run
from dhp.search.extract import TABLE_OF, ParamExtractor, stem
from dhp.search.params import ParamRegistry
from dhp.search.parse import Parser
from dhp.search.query import AnyOf, Compartment, Node, Nothing, RowCode
from dhp.store import search as sql

log = logging.getLogger("dhp.search")


@dataclass
class _Plan:
    """Which of a resource type's extractors to run, by the elements a resource has."""

    entries: list[tuple[str, str, ParamExtractor]]
    by_stem: dict[str, tuple[int, ...]]  # element name (choice suffix removed) → extractors reading it
    by_key: dict[str, tuple[int, ...]]  # exact JSON property name → extractors reading it
    always: frozenset[int]  # extractors that cannot tell in advance
    #: The extractors to run for a set of property names (see SearchEngine.rows).
    chosen: dict[frozenset[str], _Run] = field(default_factory=dict)


#: An extractor to run: (kind, code, extractor, memo key — None when no other extractor of the run shares it).
_Todo = tuple[str, str, ParamExtractor, int | None]


def _todo(entries: Iterable[tuple[str, str, ParamExtractor]]) -> tuple[_Todo, ...]:
    entries = list(entries)
    seen: dict[int, int] = {}
    for _k, _c, ex in entries:
        if ex.memo_key is not None:
            seen[ex.memo_key] = seen.get(ex.memo_key, 0) + 1
    return tuple((k, c, ex, ex.memo_key if ex.memo_key is not None and seen[ex.memo_key] > 1 else None)
                 for k, c, ex in entries)


@dataclass(slots=True)
class _Run:
    """Extractors to run together, and the same generated as one function (``dhp.search.compiled``)."""

    todo: tuple[_Todo, ...]
    fast: Run | None


#: Sets of property names remembered per resource type.
PLAN_SHAPES = 512
#: An open reindex job whose heartbeat is older than this many seconds has lost its process (a job renews it
#: with every chunk of 500 resources): another process takes it over.
REINDEX_STALE = 60.0
#: Types meaning "every resource type" in a SearchParameter's base.
_ALL_TYPES = frozenset({"Resource", "DomainResource"})
#: Search result parameters: they name no parameter whose rows a reindex rebuilds.
_RESULT_PARAMS = frozenset({"_count", "_summary", "_elements", "_total", "_format", "_pretty", "_contained",
                            "_containedType", "_maxresults", "_score", "_graph", "_cursor"})
#: Lists of extractors generated as functions, per engine; beyond it the general loop runs them. Shapes map
#: to far fewer lists (elements no parameter reads change nothing), but clients choose the shapes: one function
#: and its source take up to ~110 KiB (a type's every parameter), so the bound keeps them under ~60 MiB.
COMPILED_RUNS = 512


@cache
def _code_key() -> bytes:
    """The extraction code itself: any change to it (an upgrade) makes every stored index key stale."""
    from dhp import __version__

    h = hashlib.blake2b(__version__.encode(), digest_size=16)
    for name in ("dhp.search.engine", "dhp.search.extract", "dhp.search.compiled", "dhp.search.values",
                 "dhp.search.shared", "dhp.instants"):
        try:
            h.update(Path(sys.modules[name].__file__ or "").read_bytes())
        except OSError:  # no source next to the module (a frozen build): the version above must do
            pass
    h.update(importlib.metadata.version("fhirpathpy").encode())
    return h.digest()


def _finite(row: tuple[Any, ...]) -> bool:
    return all(type(v) is not float or math.isfinite(v) for v in row)


def _meta_core(meta: Any) -> Any:
    """``meta`` without the fields every new version changes."""
    if not isinstance(meta, dict):
        return meta
    return {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}


@dataclass
class ReindexJob:
    """Progress of one reindexing run (background after a SearchParameter change, or ``$reindex``)."""

    id: int
    types: list[str]
    codes: list[str] | None
    started: float = field(default_factory=time.time)
    done: int = 0
    total: int = 0
    current_type: str = ""
    finished: float | None = None
    error: str | None = None

    def to_parameters(self) -> dict[str, Any]:
        params: list[dict[str, Any]] = [
            {"name": "job", "valueInteger": self.id},
            {"name": "status", "valueCode": "error" if self.error else
             ("completed" if self.finished else "in-progress")},
            {"name": "processed", "valueInteger": self.done},
            {"name": "total", "valueInteger": self.total},
        ]
        if self.codes:
            params += [{"name": "code", "valueString": c} for c in self.codes]
        params += [{"name": "type", "valueCode": t} for t in self.types]
        if self.error:
            params.append({"name": "error", "valueString": self.error})
        return {"resourceType": "Parameters", "parameter": params}


class SearchEngine:
    def __init__(self, registry: Registry, terminology: Any = None) -> None:
        self.registry = registry
        self.terminology = terminology
        self._params: ParamRegistry | None = None
        self._extractors: dict[tuple[str, bool], list[tuple[str, str, ParamExtractor]]] = {}
        self._shared: dict[str, shared.Plan] = {}
        self._kinds: dict[str, tuple[str, ...]] = {}
        self._plans: dict[tuple[str, bool], _Plan] = {}
        self._signature: dict[tuple[str, str], tuple[Any, ...]] = {}
        self._single: dict[tuple[str, str], bool] = {}
        self._width: dict[tuple[str, str], int | None] = {}
        self._index_keys: dict[str, int | None] = {}
        self._touch: dict[str, tuple[list[tuple[str, str, ParamExtractor]], dict[str, frozenset[int]],
                                     frozenset[int], dict[frozenset[int], _Run]]] = {}
        #: Generated extraction functions by the extractors they run (see :meth:`_run`).
        self._runs: dict[tuple[_Todo, ...], _Run] = {}
        #: Where background reindexing writes (set by :meth:`changed_here`, or by a search or ``$reindex``).
        self.store: Any = None
        #: This process committed a conformance change: the next reload reindexes existing data in the
        #: background. A reload for another process's change does not: the process that made it does, once.
        self._reindex_next = False
        self.jobs: list[ReindexJob] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        #: This process's name in the reindex job table (``search_reindex``).
        self.owner = secrets.token_hex(8)
        #: Job rows written by this process's transactions, for the reindex its next own reload starts.
        self._own_rows: list[int] = []
        #: Open jobs in the table, as last read (:meth:`sync_jobs`), by parameter code ("*": every code).
        self._pending: dict[str, list[sql.ReindexRow]] = {}
        #: Job rows this process runs now.
        self._running: set[int] = set()
        registry.listeners.append(self.reload)

    # ------------------------------------------------------------------ parameters

    @property
    def params(self) -> ParamRegistry:
        if self._params is None:
            self._params = ParamRegistry(self.registry)
            if not self._signature:
                self._signature = self._signatures(self._params)
        return self._params

    @staticmethod
    def _signatures(params: ParamRegistry) -> dict[tuple[str, str], tuple[Any, ...]]:
        out = {}
        for base, by_code in params._by_base.items():
            for code, p in by_code.items():
                out[(base, code)] = (p.type, p.expression, p.components)
        return out

    def changed_here(self, store: Any) -> None:
        """A write transaction of this process changes conformance resources (see :meth:`reload`)."""
        self.store = store
        self._reindex_next = True

    async def record_change(self, tx: Any, new: dict[str, Any] | None, old: dict[str, Any] | None) -> None:
        """A SearchParameter is written or deleted in ``tx``: its reindex job is recorded in the same
        transaction, open until done, so every process knows from the commit on that searches on it can miss
        matches (:meth:`reindex_warnings`) and a job whose process stops is taken over (:meth:`sync_jobs`).
        The job itself starts at this process's reload after the commit (:meth:`reload`)."""
        types: set[str] = set()
        codes: set[str] = set()
        for sp in (new, old):
            if not isinstance(sp, dict):
                continue
            base, code = sp.get("base"), sp.get("code")
            types.update(b for b in (base if isinstance(base, list) else [base]) if isinstance(b, str))
            if isinstance(code, str):
                codes.add(code)
        if not types or not codes:
            return
        job_id = secrets.randbits(62)
        await sql.open_reindex_job(tx.conn, job_id, sorted(types), sorted(codes), self.owner)
        self._own_rows.append(job_id)

    def reload(self) -> None:
        """Registry listener: API-written conformance changed. New parameters apply at once to searches and
        writes; existing data is reindexed for new or changed parameters in the background, by the process
        whose write changed them (:meth:`changed_here`)."""
        before = self._params
        self._params = None
        self._extractors.clear()
        self._shared.clear()
        self._kinds.clear()
        self._plans.clear()
        self._single.clear()
        self._width.clear()
        self._index_keys.clear()
        self._touch.clear()
        self._runs.clear()
        new = self._signatures(self.params)
        old = self._signature
        self._signature = new
        changed = sorted(k for k in new.keys() | old.keys() if old.get(k) != new.get(k))  # removed ones too
        own, self._reindex_next = self._reindex_next, False
        rows, self._own_rows = self._own_rows, []
        if self.store is None or not own:
            return
        if not changed or not old:
            if rows:  # the definitions came out the same: nothing to rebuild
                self._spawn(self._finish_rows(self.store, rows))
            return
        by_code: dict[str, set[str]] = {}
        for base, code in changed:
            by_code.setdefault(code, set()).add(base)
        if before is not None:
            # A changed parameter can change which others share rows with it (a new ``family`` takes its part
            # out of ``name``'s rows): those are reindexed too.
            for t in sorted({b for b, _c in changed} & set(self.params.resource_types)):
                a, b = self._sharing(before, t), self._sharing(self.params, t)
                for code in {*a.shared, *a.partial, *b.shared, *b.partial}:
                    if a.signature(code) != b.signature(code):
                        by_code.setdefault(code, set()).add(t)
        types: set[str] = set()
        for bases in by_code.values():
            if bases & {"Resource", "DomainResource"}:
                types = set(self.params.resource_types)
                break
            types |= bases & set(self.params.resource_types)
        self._spawn(self.reindex(self.store, sorted(types), sorted(by_code), rows=rows))

    def _spawn(self, coro: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return  # no loop here (a CLI command): `$reindex` does it; open job rows are taken over
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish_rows(self, store: Any, rows: list[int], error: str | None = None) -> None:
        try:
            async with store.begin() as tx:
                await sql.finish_reindex_jobs(tx.conn, rows, self.owner, error)
        except Exception:  # left open: taken over once stale, and done again
            log.exception("could not close reindex jobs %s", rows)
            return
        # Here at once; other processes see it at their next poll.
        done = set(rows)
        self._pending = {c: kept for c, lst in self._pending.items() if (kept := [r for r in lst if r.id not in done])}

    async def sync_jobs(self, store: Any) -> None:
        """Read the open reindex jobs (every process, on its conformance poll): searches on their parameters
        warn. A job whose heartbeat is stale lost its process; one process claims it and runs it again."""
        async with store.read_conn() as conn:
            open_rows = await sql.open_reindex_jobs(conn)
        pending: dict[str, list[sql.ReindexRow]] = {}
        for row in open_rows:
            for code in row.codes if row.codes is not None else ["*"]:
                pending.setdefault(code, []).append(row)
        self._pending = pending
        stale = time.time_ns() // 1000 - int(REINDEX_STALE * 1e6)
        for row in open_rows:
            if row.heartbeat >= stale or row.id in self._running:
                continue
            async with store.begin() as tx:
                won = await sql.claim_reindex_job(tx.conn, row.id, row.heartbeat, self.owner)
            if won:
                log.warning("taking over reindex job %s of %s (its process stopped)", row.id, row.owner)
                self.store = store
                types = None if _ALL_TYPES & set(row.types) else row.types
                self._running.add(row.id)
                self._spawn(self.reindex(store, types, row.codes, rows=[row.id]))

    def reindex_warnings(self, types: list[str] | None, params: Iterable[tuple[str, str]]) -> list[Issue]:
        """Warnings for a search naming a parameter whose reindex job is open (its rows are being rebuilt):
        ``types`` searched (None: all). Chained and ``_has`` parameters count on any type."""
        if not self._pending:
            return []
        direct: set[str] = set()
        indirect: set[str] = set()
        for key, value in params:
            if key in _RESULT_PARAMS:
                continue
            if key == "_sort":
                direct.update(v.strip().lstrip("-") for v in value.split(",") if v.strip())
                continue
            if key.startswith(("_include", "_revinclude")):
                parts = value.split(":")
                if len(parts) > 1:
                    indirect.add(parts[1])
                continue
            parts = key.replace(".", ":").split(":")
            if key.startswith("_has:") or "." in key:
                indirect.update(parts)
            else:
                direct.add(parts[0])
        found: dict[int, tuple[sql.ReindexRow, set[str]]] = {}
        for code in sorted(direct | indirect):
            for row in self._pending.get(code, []) + self._pending.get("*", []):
                if code in indirect or types is None or _ALL_TYPES & set(row.types) or set(types) & set(row.types):
                    found.setdefault(row.id, (row, set()))[1].add(code)
        out = []
        for row, codes in found.values():
            progress = f"{row.done} of {row.total}" if row.total else "not started"
            out.append(Issue(
                "warning", "incomplete",
                f"Search parameter {', '.join(sorted(codes))} changed and the index of existing "
                f"{', '.join(row.types)} resources is being rebuilt (reindex job {row.id}: {progress}); until it "
                "finishes, matches can be missing and resources can match by the old definition",
                message_id="search-reindex-pending"))
        return out

    def check_definition(self, sp: dict[str, Any]) -> list[Any]:
        """Errors (``Issue``) that must refuse a SearchParameter written through the API."""
        from dhp.search.definition import check

        return check(sp, self.params, self.registry.overlay("SearchParameter"))

    @staticmethod
    def _entries(params: ParamRegistry, rtype: str) -> list[tuple[str, str, ParamExtractor]]:
        """(table kind, code, extractor) of every indexed parameter of ``rtype``."""
        out = []
        for p in params.indexed(rtype):
            kind = TABLE_OF.get(p.type)
            if kind is not None:
                try:
                    ex = ParamExtractor(p, rtype, params.resource_types)
                except Exception as e:  # an expression fhirpathpy cannot even tokenize: skip it, not every write
                    log.warning("search parameter %s (%s) on %s cannot be compiled: %s", p.url, p.code, rtype, e)
                    p.unevaluable = f"its expression cannot be compiled ({e})"  # searches say so, not miss
                    continue
                if ex.root is not None:
                    out.append((kind, p.code, ex))
        return out

    def _sharing(self, params: ParamRegistry, rtype: str) -> shared.Plan:
        return shared.plan(self._entries(params, rtype))

    def parser(self, base_url: str = "", strict: bool = False, default_count: int = 50,
               max_count: int = 1000) -> Parser:
        return Parser(self.params, base_url=base_url, terminology=self.terminology, strict=strict,
                      default_count=default_count, max_count=max_count, single_valued=self.single_valued,
                      date_width=self.date_width, sources=self.sources)

    # ------------------------------------------------------------------ extraction

    def extractors(self, rtype: str, full: bool = False) -> list[tuple[str, str, ParamExtractor]]:
        """The extractors that write ``rtype``'s index rows; ``full``: every parameter's, shared ones too (the
        rows of resources inside a Bundle, searched through ``composition.…`` codes, are written in full)."""
        got = self._extractors.get((rtype, full))
        if got is None:
            every = self._extractors.get((rtype, True))
            if every is None:
                every = self._entries(self.params, rtype)
                self._extractors[(rtype, True)] = every
                kinds = {k for k, _c, _e in every}
                if any(e.embedded for _k, _c, e in every):
                    kinds = set(sql.TABLES)  # an embedded resource's rows can land in any table
                self._kinds[rtype] = tuple(sorted(kinds))
            plan = self._shared.get(rtype)
            if plan is None:
                plan = self._shared[rtype] = shared.plan(every)
            got = []
            for kind, code, ex in every:
                if code in plan.shared:
                    continue
                part = plan.partial.get(code)
                if part is not None:
                    ex = ParamExtractor(ex.param, rtype, self.params.resource_types, part[0])
                got.append((kind, code, ex))
            self._extractors[(rtype, False)] = got
            got = every if full else got
        return got

    def sources(self, rtype: str, code: str) -> tuple[shared.Source, ...] | None:
        """Where the values of ``rtype``'s parameter ``code`` are indexed, when it shares other parameters'
        rows (see :mod:`dhp.search.shared`); None when it has rows of its own only."""
        self.extractors(rtype)
        return self._shared[rtype].sources(code)

    def _plan(self, rtype: str, full: bool = False) -> _Plan:
        plan = self._plans.get((rtype, full))
        if plan is None:
            entries = self.extractors(rtype, full)
            by_stem: dict[str, list[int]] = {}
            by_key: dict[str, list[int]] = {}
            always = []
            for i, (_kind, _code, ex) in enumerate(entries):
                # A composite on the resource itself needs all its components; it is looked at when the
                # first is there and the others are checked then.
                probes = ex.component_probes[0] if ex.component_probes else ex.probes
                if probes is None:
                    always.append(i)
                    continue
                for name in probes[0]:
                    by_stem.setdefault(name, []).append(i)
                for name in probes[1]:
                    by_key.setdefault(name, []).append(i)
            plan = _Plan(entries, {k: tuple(v) for k, v in by_stem.items()},
                         {k: tuple(v) for k, v in by_key.items()}, frozenset(always))
            self._plans[(rtype, full)] = plan
        return plan

    def rows(self, rtype: str, rid: str, resource: dict[str, Any], codes: set[str] | None = None,
             full: bool = False) -> dict[str, list[tuple[Any, ...]]]:
        """Index rows of ``resource`` per table kind: tuples of (type, id, code, *values).

        Only the parameters whose expressions can find something on this resource are evaluated (most R5
        parameters of a type read elements a given resource does not have), and parameters sharing an
        expression evaluate it once. Parameters whose values others index write none (``full``: they do).
        """
        plan = self._plan(rtype, full)
        # Resources of a type mostly have the same few sets of elements: which extractors to run is worked
        # out once per set of property names.
        shape = frozenset(resource)
        run = plan.chosen.get(shape)
        if run is None:
            todo = _todo(self._choose(plan, resource))
            if len(plan.chosen) >= PLAN_SHAPES:  # property names come from clients: keep it bounded
                return self._evaluate(rtype, rid, resource, todo, codes)
            run = plan.chosen[shape] = self._run(rtype, todo)
        if codes is not None:
            return self._evaluate(rtype, rid, resource, run.todo, codes)
        return self._apply(run, rtype, rid, resource)

    def _apply(self, run: _Run, rtype: str, rid: str, resource: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
        """``run``'s rows of ``resource``: its generated function, else the general loop."""
        if run.fast is not None:
            return run.fast(resource, rid)
        return self._evaluate(rtype, rid, resource, run.todo)

    def _run(self, rtype: str, todo: tuple[_Todo, ...]) -> _Run:
        """``todo`` with its generated function: one per distinct list of extractors (many shapes share one)."""
        run = self._runs.get(todo)
        if run is None:
            fast = None
            if len(self._runs) < COMPILED_RUNS:
                fast = compile_run(rtype, todo, lambda r, rid: self._evaluate(rtype, rid, r, todo))
            run = _Run(todo, fast)
            if fast is not None:
                self._runs[todo] = run
        return run

    def _evaluate(self, rtype: str, rid: str, resource: dict[str, Any], todo: Iterable[_Todo],
                  codes: set[str] | None = None) -> dict[str, list[tuple[Any, ...]]]:
        out: dict[str, list[tuple[Any, ...]]] = {}
        memo: dict[int, list[tuple[Any, ...]]] = {}
        for kind, code, ex, mk in todo:
            if codes is not None and code not in codes:
                continue
            try:
                if ex.embedded:
                    for inner in ex.embedded_resources(resource):
                        for kind2, lst in self.rows(inner["resourceType"], rid, inner, full=True).items():
                            out.setdefault(kind2, []).extend(
                                (rtype, rid, f"{code}.{c}", *vals) for _t, _i, c, *vals in lst)
                    continue
                if mk is None or (got := memo.get(mk)) is None:  # type: ignore[assignment]
                    convert = ex.convert
                    values = ex.root(resource) if convert is not None else None  # type: ignore[misc]
                    got = convert(values) if values else []  # type: ignore[misc]
                    if mk is not None:
                        memo[mk] = got
            except Exception as e:  # a value we cannot read must not fail the write
                log.warning("indexing %s/%s %s failed: %s", rtype, rid, code, e)
                continue
            if got:
                lst = out.setdefault(kind, [])
                if len(got) == 1:
                    lst.append((rtype, rid, code, *got[0]))
                else:
                    lst.extend([(rtype, rid, code, *r) for r in got])
        return out

    @staticmethod
    def _choose(plan: _Plan, resource: dict[str, Any]) -> tuple[tuple[str, str, ParamExtractor], ...]:
        """The extractors that can find something on a resource with these property names, in plan order."""
        by_stem, by_key = plan.by_stem, plan.by_key
        todo = set(plan.always)
        present: set[str] = set()
        for k in resource:
            present.add(k)
            if (x := by_key.get(k)) is not None:
                todo.update(x)
            if (x := by_stem.get(k)) is not None:
                todo.update(x)
            st = stem(k)
            if st is not None:
                present.add(st)
                if (x := by_stem.get(st)) is not None:
                    todo.update(x)
        out = []
        for i in sorted(todo):
            ex = plan.entries[i][2]
            if ex.component_probes is not None and any(
                    st.isdisjoint(present) and ks.isdisjoint(resource) for st, ks in ex.component_probes):
                continue
            out.append(plan.entries[i])
        return tuple(out)

    def single_valued(self, rtype: str, code: str) -> bool:
        """At most one index row per resource: the parameter reads one element with max cardinality 1.

        Then several conditions on it may be checked on the same row (one index range scan, not two).
        """
        key = (rtype, code)
        got = self._single.get(key)
        if got is None:
            got = False
            for kind, c, ex in self.extractors(rtype):
                if c != code or ex.single_element is None or kind not in ("date", "number", "quantity",
                                                                          "string", "uri"):
                    continue
                if kind == "string" and ex.param.type != "string":
                    continue
                got = self._max_one(rtype, ex.single_element, kind)
            self._single[key] = got
        return got

    def date_width(self, rtype: str, code: str) -> int | None:
        """The widest range a value of this date parameter can span (µs), when every value is a date,
        dateTime or instant — at worst a year (``1975``) — and None when Periods or Timings may come in."""
        key = (rtype, code)
        if key in self._width:
            return self._width[key]
        got: int | None = None
        for kind, c, ex in self.extractors(rtype):
            if c != code or kind != "date" or ex.single_element is None:
                continue
            types = self._element_types(rtype, ex.single_element)
            if types and types <= {"date", "dateTime", "instant"}:
                got = 367 * 86_400_000_000
        self._width[key] = got
        return got

    def _element_types(self, rtype: str, element: str) -> set[str]:
        sd = self.registry.structure_definition(rtype)
        for el in (sd or {}).get("snapshot", {}).get("element", []):
            if el.get("path") in (f"{rtype}.{element}", f"{rtype}.{element}[x]"):
                return {t.get("code") for t in el.get("type") or []}
        return set()

    def _max_one(self, rtype: str, element: str, kind: str) -> bool:
        sd = self.registry.structure_definition(rtype)
        for el in (sd or {}).get("snapshot", {}).get("element", []):
            if el.get("path") in (f"{rtype}.{element}", f"{rtype}.{element}[x]"):
                types = {t.get("code") for t in el.get("type") or []}
                # One element can still give several rows: a Timing's events, a HumanName's parts.
                many = {"Timing", "HumanName", "Address", "CodeableConcept", "SampledData"}
                return el.get("max") == "1" and not types & many
        return False

    def kinds(self, rtype: str) -> tuple[str, ...]:
        self.extractors(rtype)
        return self._kinds[rtype]

    def capability_params(self) -> dict[str, list[dict[str, Any]]]:
        """Per resource type, the search parameters a search there can use, as CapabilityStatement
        ``rest.resource.searchParam`` entries: the ones the server evaluates, never the ones it reports as
        unsupported (``_text``, ``_filter``, a number parameter over dates …)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for rtype in sorted(self.params.resource_types):
            entries = []
            for code, p in sorted(self.params.for_type(rtype).items()):
                if not p.searchable:
                    continue
                e: dict[str, Any] = {"name": code}
                if p.url:
                    e["definition"] = p.url
                e["type"] = p.type
                entries.append(e)
            if entries:
                out[rtype] = entries
        return out

    # ------------------------------------------------------------------ write hooks

    def index_key(self, rtype: str) -> int | None:
        """Names the extraction that writes ``rtype``'s index rows — its parameters (expressions, types,
        components, the rows they share), the resource types known and the extraction code — as a signed
        64-bit number stored with each resource. Equal keys write equal rows for equal content, so an update
        under the key that indexed the current version changes only the rows that differ (:meth:`index`).
        None when a resource's rows depend on more than its own type's parameters (Bundles index the
        resources inside them with every type's parameters)."""
        if rtype in self._index_keys:
            return self._index_keys[rtype]
        entries = self.extractors(rtype)
        key: int | None = None
        if not any(ex.embedded for _k, _c, ex in entries):
            parts = [sorted(self.params.resource_types)]
            for kind, code, ex in entries:
                p = ex.param
                parts.append([kind, code, p.type, p.expression, list(p.targets), sorted(ex.skip),
                              [[c.definition, c.expression, c.type] for c in p.components]])
            h = hashlib.blake2b(_code_key(), digest_size=8)
            h.update(orjson.dumps(parts))
            key = int.from_bytes(h.digest(), "big", signed=True)
        self._index_keys[rtype] = key
        return key

    async def index(self, tx: Any, rtype: str, rid: str, resource: dict[str, Any], *,
                    fresh: bool | None = None, old: Any = None) -> None:
        """Write the resource's index rows (inside the caller's write transaction).

        Version 1 of a resource has no rows yet (a delete removes them), so a create skips the deletes.
        ``old``: the version being replaced (a ``StoredResource``). When the same extraction
        (:meth:`index_key`) indexed it, its rows are exactly what that extraction makes of its content: only
        the rows that differ are deleted and added — an update rewriting a phone number touches two rows, not
        the dozen the resource has. Otherwise all its rows are replaced.
        """
        if fresh is None:
            meta = resource.get("meta")
            fresh = isinstance(meta, dict) and meta.get("versionId") == "1"
        if (not fresh and old is not None and not old.deleted and old.index_key is not None
                and old.index_key == self.index_key(rtype)):
            try:
                before = fhirjson.fast_loads(old.content)
            except orjson.JSONDecodeError:  # stored bytes are JSON; if not, replace everything
                before = None
            if isinstance(before, dict):
                got = self._changes(rtype, rid, before, resource)
                if got is not None:
                    removed, added = got
                    if removed or added:
                        await tx.replace_index(rtype, rid, added, (), fresh=False, removed=removed)
                    return
        rows = self.rows(rtype, rid, resource)
        kinds = self.kinds(rtype) if not fresh else ()
        await tx.replace_index(rtype, rid, rows, kinds, fresh=fresh)

    def _changes(self, rtype: str, rid: str, before: dict[str, Any], after: dict[str, Any],
                 ) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, list[tuple[Any, ...]]]] | None:
        """The index rows to remove and to add when ``before`` becomes ``after`` (per table kind), or None
        when they cannot be worked out row by row.

        A parameter's rows depend only on the top-level elements its expression starts from (the same
        probes that let :meth:`rows` skip absent ones): only parameters reading an element that changed
        are evaluated, on both versions. A phone number changed is two rows, and two extractions, not all.
        """
        changed = [k for k in before.keys() | after.keys() if before.get(k) != after.get(k)]
        if "meta" in changed and _meta_core(before.get("meta")) == _meta_core(after.get("meta")):
            changed.remove("meta")  # versionId and lastUpdated are not indexed rows
        run = self._touched(rtype, changed)
        if not run.todo:
            return {}, {}
        old_rows, new_rows = self._apply(run, rtype, rid, before), self._apply(run, rtype, rid, after)
        removed: dict[str, list[tuple[Any, ...]]] = {}
        added: dict[str, list[tuple[Any, ...]]] = {}
        for kind in old_rows.keys() | new_rows.keys():
            old_list, new_list = old_rows.get(kind, []), new_rows.get(kind, [])
            if kind in sql.FLOAT_KINDS and not (all(map(_finite, old_list)) and all(map(_finite, new_list))):
                return None  # a NaN equals nothing, not even itself: no row can be matched to delete it
            old_set, new_set = set(old_list), set(new_list)
            if gone := [r for r in dict.fromkeys(old_list) if r not in new_set]:
                removed[kind] = gone
            if new := [r for r in dict.fromkeys(new_list) if r not in old_set]:
                added[kind] = new
        return removed, added

    def _touched(self, rtype: str, keys: Iterable[str]) -> _Run:
        """The extractors of ``rtype``'s own rows that read any of these top-level properties."""
        touch = self._touch.get(rtype)
        if touch is None:
            entries = self.extractors(rtype)
            by_name: dict[str, set[int]] = {}
            always: set[int] = set()
            for i, (_kind, _code, ex) in enumerate(entries):
                # A composite on the resource itself reads each component's elements; others read below
                # their own root only.
                probes = ex.component_probes if ex.component_probes is not None else [ex.probes]
                if any(p is None for p in probes):
                    always.add(i)
                    continue
                for stems, names in probes:  # type: ignore[misc]
                    for n in (*stems, *names):
                        by_name.setdefault(n, set()).add(i)
            touch = self._touch[rtype] = (entries, {k: frozenset(v) for k, v in by_name.items()},
                                          frozenset(always), {})
        entries, by_name, always, runs = touch
        picked = set(always)
        for k in keys:
            picked.update(by_name.get(k, ()))
            st = stem(k)
            if st is not None:
                picked.update(by_name.get(st, ()))
        key = frozenset(picked)
        run = runs.get(key)
        if run is None:
            todo = _todo(entries[i] for i in sorted(picked))
            if len(runs) >= PLAN_SHAPES:  # which elements changed comes from clients: keep it bounded
                return _Run(todo, None)
            run = runs[key] = self._run(rtype, todo)
        return run

    async def unindex(self, tx: Any, rtype: str, rid: str) -> None:
        """Drop the resource's index rows (a delete). Every table, not only this type's current kinds: rows
        of a parameter since removed must go too. On PostgreSQL they join the transaction's one statement."""
        await tx.replace_index(rtype, rid, {}, tuple(sql.TABLES), fresh=False)

    async def reindex_one(self, tx: Any, rtype: str, rid: str, resource: dict[str, Any]) -> None:
        """Rewrite all of one resource's rows (instance ``$reindex``), marked as rewritten like a batch's."""
        await self.index(tx, rtype, rid, resource, fresh=False)
        await sql.mark_rewritten(tx.conn, rtype, [rid])

    async def index_many(self, tx: Any, items: list[tuple[str, str, bytes | dict[str, Any]]], *,
                         fresh: bool = True) -> None:
        """Index many resources at once (package install, reindex, audit events): their stored JSON, or the
        parsed resource when the caller has it. ``fresh``: they have no rows yet."""
        rows: dict[str, list[tuple[Any, ...]]] = {}
        keys = []
        for rtype, rid, content in items:
            try:
                res = content if isinstance(content, dict) else fhirjson.fast_loads(content)
            except Exception:
                log.warning("cannot index %s/%s: not JSON", rtype, rid)
                continue
            keys.append((rtype, rid))
            for kind, lst in self.rows(rtype, rid, res).items():
                rows.setdefault(kind, []).extend(lst)
        if not fresh and keys:
            await sql.delete_many(tx.conn, keys)
        await tx.insert_index(rows)

    # ------------------------------------------------------------------ reindexing

    async def reindex(self, store: Any, types: list[str] | None = None, codes: list[str] | None = None,
                      job: ReindexJob | None = None, batch: int = 500, rows: list[int] | None = None,
                      ) -> ReindexJob:
        """Rebuild index rows of the given types (all present when None), for ``codes`` only or all.
        ``rows``: this process's open job rows in ``search_reindex`` that this run does: their heartbeat is
        renewed with every chunk, and they are closed at the end."""
        if job is None:
            job = ReindexJob(len(self.jobs) + 1, list(types or []), codes)
            self.jobs.append(job)
            del self.jobs[:-20]
        rows = held = rows or []
        self._running.update(held)
        error: str | None = None
        covers = sorted(types) if types is not None else ["Resource"]  # what the job rows will say
        try:
            async with store.read_conn() as conn:
                present = await sql.types_present(conn)
                if types is None:
                    types = sorted(t for t in present if t in self.params.resource_types)
                types = [t for t in types if t in present]
                job.types = types
                for t in types:
                    job.total += await sql.count_type(conn, t)
            if rows:
                async with store.begin() as tx:
                    mine = await sql.beat_reindex_jobs(tx.conn, rows, self.owner, 0, job.total, types=covers,
                                                       codes=codes)
                if not mine:
                    # Not committed yet (a transaction still open when this reload came), or taken over: the
                    # change seen here is reindexed all the same; the rows are closed by whoever owns them.
                    rows = []
            wanted = set(codes) if codes else None
            for t in types:
                job.current_type = t
                after = ""
                while True:
                    async with store.begin() as tx:
                        chunk = await sql.scan_resources(tx.conn, t, after, batch)
                        if not chunk:
                            break
                        await self._reindex_chunk(tx, t, chunk, wanted)
                        if rows and not await sql.beat_reindex_jobs(tx.conn, rows, self.owner,
                                                                    job.done + len(chunk), job.total):
                            return job  # presumed gone and taken over: the other process finishes it
                    after = chunk[-1][0]
                    job.done += len(chunk)
                    await asyncio.sleep(0)
        except Exception as e:
            job.error = error = str(e)
            log.exception("reindex failed")
        finally:
            job.finished = time.time()
            if rows:
                await self._finish_rows(store, rows, error)
            self._running.difference_update(held)
        return job

    async def _reindex_chunk(self, tx: Any, rtype: str, chunk: list[tuple[str, bytes]],
                             wanted: set[str] | None) -> None:
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for rid, content in chunk:
            res = fhirjson.fast_loads(content)
            for kind, lst in self.rows(rtype, rid, res, wanted).items():
                rows.setdefault(kind, []).extend(lst)
        keys = [(rtype, rid) for rid, _ in chunk]
        if wanted is None:
            await sql.delete_many(tx.conn, keys)
        else:
            # Only the named parameters' rows are rebuilt; other rows stay.
            for code in wanted:
                p = self.params.get(rtype, code)
                kind = TABLE_OF.get(p.type) if p is not None else None
                for k in ([kind] if kind else list(sql.TABLES)):
                    await sql.delete_code_for(tx.conn, k, rtype, code, [i for _t, i in keys])
        await tx.insert_index(rows)
        await sql.mark_rewritten(tx.conn, rtype, [i for _t, i in keys])

    # ------------------------------------------------------------------ restrictions

    def restrictions(self, ctx: Any, rtype: str) -> list[Node]:
        """Conditions the caller's authorisation adds to every search on ``rtype``."""
        principal = getattr(ctx, "principal", None)
        if principal is None:
            return []
        out: list[Node] = []
        # Only patient/ scopes confine a search to the patient's compartment (a user/ scope for the same type
        # widens it), and only for types that belong to that compartment — as check_resource does for reads.
        compartment = getattr(principal, "compartment", None)
        patient = compartment("s", rtype) if callable(compartment) else getattr(principal, "patient", None)
        if patient and (rtype == "Patient" or self.params.compartment_params("Patient", rtype)):
            out.append(self.compartment_node("Patient", str(patient), rtype))
        qf = getattr(principal, "query_filters", None)
        if callable(qf):
            sets = qf("s", rtype)
            if sets:
                parser = self.parser()
                alts = []
                for s in sets:
                    items = parse_qsl(s, keep_blank_values=True) if isinstance(s, str) else list(s)
                    alts.append(parser.nodes(rtype, items))
                out.append(AnyOf(alts))
        return out

    def compartment_node(self, comp_type: str, comp_id: str, rtype: str) -> Node:
        if comp_type not in self.params.compartments:
            raise FHIRError(400, f"'{comp_type}' is not a compartment type", "invalid",
                            message_id="search-compartment-unknown")
        codes = self.params.compartment_params(comp_type, rtype)

        def rows_of(c: str) -> str:
            got = self.sources(rtype, c)
            return c if got is None else RowCode(c, got)

        if rtype == comp_type:
            # The compartment's own resource, plus others of its type linked to it (Patient.link).
            return Compartment(comp_type, comp_id, tuple(rows_of(c) for c in codes or () if c != "{def}"), True)
        if not codes:
            return Nothing()
        return Compartment(comp_type, comp_id, tuple(rows_of(c) for c in codes if c != "{def}"))
