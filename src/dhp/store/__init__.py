"""Persistence: resources, their history and counters — the only module that speaks SQL.

One interface over two backends: SQLite (embedded default, WAL) and PostgreSQL (asyncpg).

Writes go through :meth:`Store.begin`, a single database transaction. On SQLite every write transaction
runs under ``BEGIN IMMEDIATE`` on one writer connection, so read-then-write cannot lose updates; writers that
queue behind each other share one commit (each inside its own savepoint), and the WAL is checkpointed off the
write path. On PostgreSQL the current row is locked with ``SELECT … FOR UPDATE``. Reads use a separate engine (and, on
the hot path, the driver directly: the stored JSON bytes are served as they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    Engine,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    literal,
    literal_column,
    select,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from dhp.store.schema import counters, history, installed_packages, metadata, resources

__all__ = [
    "ConflictError", "HistoryPage", "Store", "StoredResource", "WriteTx", "metadata", "new_id", "now_us",
]

CONFORMANCE_EPOCH = "conformance_epoch"
#: SQLSTATE of the write statement refusing itself: a resource row it updates changed since it was read
#: (division by zero, raised on purpose: see ``dhp.store.search.flush_statement``).
ROWS_REWRITTEN = "22012"


# sqlite3 binds only exact int, float, str and bytearray parameters directly. Any other (every NULL of an
# index row, the content bytes, the deleted flag) goes through its adapter lookup, which on CPython 3.11
# builds and discards a formatted AttributeError when no adapter is registered: ~1 µs per parameter, a sixth
# of an index row's insert (token rows carry three or four NULLs). Registered, the lookup is one dict hit; the
# values bound are the same (None is NULL, bytes a blob, a bool 0 or 1).
sqlite3.register_adapter(type(None), {}.get)  # x → None, without a Python frame
sqlite3.register_adapter(bytes, bytes)
sqlite3.register_adapter(bool, int)


def _rewritten(sqlstate: Any) -> ConflictError | None:
    """The conflict a PostgreSQL write statement reports by refusing itself (``ROWS_REWRITTEN``), else None."""
    if str(sqlstate or "") == ROWS_REWRITTEN:
        return ConflictError("a reindex rewrote a resource's index rows meanwhile")
    return None


class StoredResource(NamedTuple):
    type: str
    id: str
    version: int
    last_updated: int  # microseconds since the epoch, UTC
    deleted: bool
    content: bytes
    #: Which extraction wrote the resource's search index rows (``SearchEngine.index_key``); None: unknown.
    #: Filled only where a write reads the current version.
    index_key: int | None = None


class ConflictError(Exception):
    """A concurrent writer got there first (unique key taken); the caller may retry."""


# Statements of the write path, built once (SQLAlchemy then reuses their compiled form).
_CURRENT_FOR_UPDATE = select(resources.c.type, resources.c.id, resources.c.version, resources.c.last_updated,
                             resources.c.deleted, resources.c.content, resources.c.index_key).where(
    resources.c.type == bindparam("k_type"), resources.c.id == bindparam("k_id")).with_for_update()
_PG_READ = ("SELECT type, id, version, last_updated, deleted, content, index_key FROM resources "
            "WHERE type = $1 AND id = $2")
# Keys travel as one JSON text: asyncpg encodes list parameters element by element (see flush_statement).
_PG_READ_MANY = ("SELECT r.type, r.id, r.version, r.last_updated, r.deleted, r.content, r.index_key "
                 "FROM jsonb_array_elements($1::text::jsonb) AS k "
                 "JOIN resources r ON r.type = k->>0 AND r.id = k->>1")
# The same on SQLite, through the driver (see WriteTx.current).
_SQLITE_CURRENT = ("SELECT type, id, version, last_updated, deleted, content, index_key FROM resources "
                   "WHERE type = ? AND id = ?")
_SQLITE_UPDATE = ("UPDATE resources SET version = ?, last_updated = ?, deleted = ?, patient = ?, package = ?, "
                  "content = ?, index_key = ? WHERE type = ? AND id = ?")
_SQLITE_INSERT = ("INSERT INTO resources (type, id, version, last_updated, deleted, patient, package, content, "
                  "index_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
_SQLITE_EXISTS = "SELECT 1 FROM resources WHERE type = ? AND id = ?"
_SQLITE_VERSION_EXISTS = "SELECT 1 FROM history WHERE type = ? AND id = ? AND version = ?"
_SQLITE_HISTORY = ("INSERT INTO history (type, id, version, last_updated, deleted, method, content) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)")


@dataclass
class HistoryPage:
    entries: list[tuple[StoredResource, str]]  # (version, method)
    total: int
    max_seq: int


def now_us() -> int:
    """Now, in microseconds since the epoch, truncated to the millisecond that meta.lastUpdated shows."""
    return time.time_ns() // 1_000_000 * 1000


def _condition_key(rtype: str, params: Sequence[tuple[str, str]]) -> int:
    """The advisory lock key of a conditional search: reordered forms of one condition share it."""
    norm = "&".join(sorted(f"{k}={v}" for k, v in params))
    return int.from_bytes(hashlib.blake2b(f"{rtype}?{norm}".encode(), digest_size=8).digest(), "big", signed=True)


def new_id() -> str:
    """A server-assigned resource id: a UUID version 7 (RFC 9562), its first 48 bits the time in ms.

    Ids that grow with time land at the right-hand end of every B-tree keyed by id (the resources' and
    history's primary keys, the search tables' resource index), so a write touches a few hot pages instead
    of a random page per tree; uuid4 ids cost SQLite and PostgreSQL a page read and write per tree at scale.
    74 random bits keep them unguessable.
    """
    b = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big"))
    b += os.urandom(10)
    b[6] = 0x70 | b[6] & 0x0F  # version 7
    b[8] = 0x80 | b[8] & 0x3F  # RFC 9562 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _pg_connect_args(url: str) -> dict[str, Any]:
    """asyncpg's arguments for ``url`` as SQLAlchemy's asyncpg dialect reads it: the query's options too, so
    ``postgresql+asyncpg://user@/db?host=/var/run/postgresql`` reaches the server's Unix socket here as well."""
    u = make_url(url)
    args: dict[str, Any] = {"user": u.username, "password": u.password, "host": u.host, "port": u.port,
                            "database": u.database}
    for k, v in u.query.items():
        args[k] = v if isinstance(v, str) else v[-1]
    if isinstance(args.get("port"), str):
        args["port"] = int(args["port"])
    return args


class _OwnedConnections:
    """Driver connections a store owns outright for one kind of single statement (reads by id, write-only
    transactions), at most ``limit`` busy at once by the caller's own bookkeeping. A pool's acquire and release
    (the release is a shielded task) cost more than such a statement. A connection whose state is in doubt —
    it failed under the statement, or the statement was cancelled — is closed, not reused; the next statement
    connects anew."""

    def __init__(self, url: str, limit: int) -> None:
        self.url = url
        self.limit = limit
        self.idle: list[Any] = []

    async def run(self, fn: Callable[[Any], Awaitable[Any]], *, idempotent: bool = False) -> Any:
        """``await fn(connection)``. ``idempotent`` (a read): when an idle connection turns out dead under it
        (the database restarted, or ended the session, while it sat idle), it runs once more on a new one."""
        import asyncpg

        c = None
        while self.idle:
            c = self.idle.pop()
            if not c.is_closed():
                break
            c = None
        reused = c is not None
        if c is None:
            c = await asyncpg.connect(**_pg_connect_args(self.url))
        reusable = False
        try:
            result = await fn(c)
            reusable = True
            return result
        except Exception as e:
            if isinstance(e, asyncpg.PostgresError) and not unavailable(e):
                reusable = not c.is_closed()  # PostgreSQL refused the statement (and undid it): still sound
                raise
            # The session ended (an administrator, a shutdown, a cut connection). Sessions end together: the
            # idle ones go too. A read runs again on a new connection if this one had sat idle — it may have
            # died before the statement was sent.
            if unavailable(e):
                self.drop_idle()
                if idempotent and reused:
                    c.terminate()
                    return await self.run(fn)
            raise
        finally:
            if reusable and not c.is_closed() and len(self.idle) < self.limit:
                self.idle.append(c)
            else:
                c.terminate()

    def drop_idle(self) -> None:
        """Cut the idle connections (their sessions are presumed dead)."""
        idle, self.idle = self.idle, []
        for c in idle:
            c.terminate()

    async def close(self) -> None:
        """Say goodbye on the idle connections; a statement finishing later closes its own."""
        self.limit = 0
        idle, self.idle = self.idle, []
        for c in idle:
            with contextlib.suppress(Exception):
                await c.close(timeout=5)


def _storable(key: str) -> bool:
    """Whether PostgreSQL text can hold ``key``: no U+0000, valid UTF-8 (no lone surrogates)."""
    if "\x00" in key:
        return False
    if key.isascii():
        return True
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


class _BatchedReads:
    """PostgreSQL primary-key reads on one server (the primary, or the replica that serves reads): up to
    PG_READS_IN_FLIGHT on the wire at once; reads arriving meanwhile go together in the next query, one
    join (a queued read is answered by a query sent after it arrived, never by an older one)."""

    def __init__(self, url: str, spawn: Callable[[Any], None]) -> None:
        self.conns = _OwnedConnections(url, PG_READS_IN_FLIGHT)
        self._spawn = spawn
        self._in_flight = 0
        self._queue: list[tuple[str, str, asyncio.Future[StoredResource | None]]] = []

    async def read(self, rtype: str, rid: str) -> StoredResource | None:
        if not (_storable(rtype) and _storable(rid)):
            return None  # no row can hold it, and in a batch it would fail the other reads with it
        if self._in_flight < PG_READS_IN_FLIGHT and not self._queue:
            self._in_flight += 1
            try:
                row = await self.conns.run(lambda c: c.fetchrow(_PG_READ, rtype, rid), idempotent=True)
            finally:
                self._in_flight -= 1
                self._flush()
            return StoredResource(*row) if row else None
        fut: asyncio.Future[StoredResource | None] = asyncio.get_running_loop().create_future()
        self._queue.append((rtype, rid, fut))
        self._flush()
        return await fut

    def _flush(self) -> None:
        while self._queue and self._in_flight < PG_READS_IN_FLIGHT:
            batch, self._queue = self._queue[:PG_READ_BATCH], self._queue[PG_READ_BATCH:]
            self._in_flight += 1
            self._spawn(self._batch(batch))

    async def _batch(self, batch: list[tuple[str, str, asyncio.Future[StoredResource | None]]]) -> None:
        try:
            rows = await self.conns.run(
                lambda c: c.fetch(_PG_READ_MANY, orjson.dumps([b[:2] for b in batch]).decode()), idempotent=True)
        except BaseException as e:
            for _t, _i, f in batch:
                if not f.done():
                    f.set_exception(e if isinstance(e, Exception) else ConnectionError("read cancelled"))
            if not isinstance(e, Exception):
                raise
            return
        finally:
            self._in_flight -= 1
            self._flush()
        found = {(r[0], r[1]): r for r in rows}
        for t, i, f in batch:
            if not f.done():
                row = found.get((t, i))
                f.set_result(StoredResource(*row) if row else None)


def _merge(items: Iterable[_Pending]) -> _Pending:
    """Several transactions' queued writes as one (they touch different resources)."""
    out = _Pending()
    for p in items:
        out.inserts += p.inserts
        out.generated += p.generated
        out.updates += p.updates
        out.history += p.history
        out.keys |= p.keys
        out.index_keys |= p.index_keys
        for k, v in p.index_deletes.items():
            out.index_deletes.setdefault(k, []).extend(v)
        for k, v in p.index_removed.items():
            out.index_removed.setdefault(k, []).extend(v)
        for k, v in p.index_rows.items():
            out.index_rows.setdefault(k, []).extend(v)
    return out


def _settle(fut: asyncio.Future[None], error: Exception | None) -> None:
    if fut.done():  # the waiting caller was cancelled
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _sqlite_path(url: str) -> str | None:
    u = make_url(url)
    if not u.drivername.startswith("sqlite"):
        return None
    return u.database or ":memory:"


class SyncConn:
    """Gives a synchronous SQLAlchemy connection the awaitable ``execute`` of an AsyncConnection.

    SQLite writes are serialised anyway: a transaction's statements run on the event loop thread (a thread hop
    per statement, as aiosqlite makes, dominated write latency). Its plain writes are buffered instead and run
    with the rest of its group's at the commit (see ``Store._commit_group``).
    """

    def __init__(self, conn: Connection, before: Callable[[], Awaitable[None]] | None = None) -> None:
        self.sync_connection = conn
        self._raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        #: Awaited before any statement of another module (see ``WriteTx._isolate``).
        self._before = before

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        if self._before is not None:
            await self._before()
        return self.sync_connection.execute(statement, parameters)

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._before is not None:
            await self._before()
        return fn(self.sync_connection, *args)


#: How a buffered SQLite write runs (``WriteTx._sq``): ``execute(sql, params)``, ``executemany(sql, params)``,
#: or ``params`` are rows for the one-row INSERT ``sql``: they go in multi-row INSERTs together with the rows
#: other writes of the batch add to the table (see :func:`run_sqlite_writes`).
SQ_EXEC, SQ_MANY, SQ_ROWS = 0, 1, 2
#: Bound parameters per statement: SQLite's limit before 3.32 (later ones allow 32,766).
SQLITE_MAX_PARAMS = 999
_multi_sql: dict[tuple[str, int], str] = {}


def _multi_row(sql_text: str, n: int) -> str:
    """``INSERT … VALUES (?, …)`` with ``n`` rows of placeholders."""
    got = _multi_sql.get((sql_text, n))
    if got is None:
        head, sep, values = sql_text.partition(" VALUES ")
        assert sep, sql_text
        got = _multi_sql[(sql_text, n)] = head + sep + ", ".join([values] * n)
    return got


_narrow_sql: dict[tuple[str, int], str] = {}


def _narrow(sql_text: str, width: int) -> str:
    """The one-row ``INSERT INTO t (c1, c2, …) VALUES (?, ?, …)`` naming only its first ``width`` columns."""
    got = _narrow_sql.get((sql_text, width))
    if got is None:
        head, sep, _values = sql_text.partition(" VALUES ")
        table, paren, cols = head.partition(" (")
        assert sep and paren, sql_text
        names = cols.rstrip(")").split(", ")
        got = _narrow_sql[(sql_text, width)] = (
            f"{table} ({', '.join(names[:width])}) VALUES ({', '.join(['?'] * width)})")
    return got


def _insert_rows(raw: sqlite3.Connection, sql_text: str, rows: list[tuple[Any, ...]]) -> None:
    """Rows for one table, each run of them in as few statements as the parameter limit allows.

    Trailing NULLs are left out: a row ``(…, value, None, None, None)`` goes in a statement naming only the
    columns up to ``value`` (the others take their default, NULL: no column of ours has another). The sqlite3
    module binds a None through its adaptation protocol, ~1,300 instructions each, and most token rows end in
    three of them (no text, no identifier type)."""
    full = len(rows[0])
    runs: dict[int, list[tuple[Any, ...]]] = {}
    for r in rows:
        n = full
        while n > 1 and r[n - 1] is None:
            n -= 1
        run = runs.get(n)
        if run is None:
            runs[n] = [r if n == full else r[:n]]
        else:
            run.append(r if n == full else r[:n])
    for n, run in runs.items():
        _insert_run(raw, sql_text if n == full else _narrow(sql_text, n), run)


def _insert_run(raw: sqlite3.Connection, sql_text: str, rows: list[tuple[Any, ...]]) -> None:
    """A statement inserts all its VALUES in one run (executemany runs the statement once per row, and that
    per-run overhead was ~15 % of SQLite's work on a create's index rows). A count that does not fill a
    statement is split into powers of two, so each table needs a handful of statement texts, all kept
    prepared."""
    per = max(1, SQLITE_MAX_PARAMS // len(rows[0]))
    i, n = 0, len(rows)
    while i < n:
        left = n - i
        k = per if left >= per else 1 << (left.bit_length() - 1)
        if k == 1:
            raw.execute(sql_text, rows[i])
        else:
            raw.execute(_multi_row(sql_text, k), tuple(chain.from_iterable(rows[i:i + k])))
        i += k


_TABLE_RE = re.compile(r"^(?:INSERT INTO|UPDATE|DELETE FROM) (\w+)")
_tables: dict[str, str] = {}


def _table(sql_text: str) -> str:
    t = _tables.get(sql_text)
    if t is None:
        m = _TABLE_RE.match(sql_text)
        t = m.group(1) if m else ""  # unknown: never phased (see _phased)
        if len(_tables) < 10_000:
            _tables[sql_text] = t
    return t


def _phased(writes: list[tuple[str, Any, int]]) -> bool:
    """Whether ``writes`` may run as all their other statements first, then the rows they add: no statement
    changes a table after rows were added to it."""
    added: list[str] = []  # the INSERTs of rows so far (a create's writes are only these: no lookups)
    for sql_text, _params, mode in writes:
        if mode == SQ_ROWS:
            added.append(sql_text)
        elif added:
            t = _table(sql_text)
            if not t or any(_table(a) == t for a in added):
                return False
    return True


def run_sqlite_writes(raw: sqlite3.Connection, batches: Iterable[list[tuple[str, Any, int]]]) -> None:
    """Run buffered writes: ``batches`` are transactions' writes, and no two of them write one resource (a
    transaction that reads a resource another one's batch writes makes it run first: ``Store._ready``).

    So each batch's updates and deletes run first, in order, and the rows all batches add to a table go in
    together at the end: per table, a few multi-row INSERTs for the whole group instead of one per
    transaction (SQLite's cost per statement run was as much again as its work per row). A batch that
    changes a table after adding rows to it runs in its own order.
    """
    rows: dict[str, list[tuple[Any, ...]]] = {}

    def add_rows() -> None:
        for insert_sql, lst in rows.items():
            _insert_rows(raw, insert_sql, lst)
        rows.clear()

    for writes in batches:
        phased = _phased(writes)
        if not phased:
            add_rows()
        for sql_text, params, mode in writes:
            if mode == SQ_ROWS:
                lst = rows.get(sql_text)
                if lst is None:
                    rows[sql_text] = list(params)
                else:
                    lst += params
                continue
            if not phased:
                add_rows()
            if mode == SQ_MANY:
                raw.executemany(sql_text, params)
            else:
                raw.execute(sql_text, params)
        if not phased:
            add_rows()
    add_rows()


class _PgTxConn:
    """The PostgreSQL write connection as other modules see it: the transaction's SQLAlchemy connection is
    opened on their first statement, and writes queued by :class:`WriteTx` go out first, so every statement
    sees them."""

    def __init__(self, tx: WriteTx) -> None:
        self._tx: WriteTx | None = tx  # None once the transaction is over (Store.begin breaks the cycle)

    async def _conn(self) -> AsyncConnection:
        if self._tx is None:
            raise RuntimeError("the write transaction is over")
        return await self._tx.connection()

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        conn = await self._conn()
        return await conn.execute(statement, parameters)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Any:
        conn = await self._conn()
        return await conn.exec_driver_sql(statement, parameters)

    async def run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        conn = await self._conn()
        return await conn.run_sync(fn, *args)


@dataclass
class _Pending:
    """Writes of one PostgreSQL transaction not yet sent: they go out as ONE statement (data-modifying CTEs),
    before the next statement of the transaction or at its commit. A create then costs one round trip
    between BEGIN and COMMIT, and a transaction Bundle a handful, not several per entry."""

    inserts: list[tuple[Any, ...]] = field(default_factory=list)
    updates: list[tuple[Any, ...]] = field(default_factory=list)
    history: list[tuple[Any, ...]] = field(default_factory=list)
    keys: set[tuple[str, str]] = field(default_factory=set)
    index_keys: set[tuple[str, str]] = field(default_factory=set)
    index_deletes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    #: Single index rows to delete (an update rewriting only what changed), per table kind.
    index_removed: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    index_rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)
    #: How many of ``inserts`` have ids just made by ``new_id()``.
    generated: int = 0
    _touched: set[tuple[str, str]] | None = None

    def __bool__(self) -> bool:
        return bool(self.keys or self.index_keys)

    def touched(self) -> set[tuple[str, str]]:
        """The resources it writes rows of (computed once: it is asked several times on its way out)."""
        t = self._touched
        if t is None:
            t = self._touched = self.keys | self.index_keys if self.index_keys - self.keys else self.keys
        return t

    def fresh(self) -> bool:
        """Only creates under freshly generated ids: nothing else can write those resources before it commits,
        so it can neither be stale nor make another transaction stale (``Store._outdated_by``)."""
        return not self.updates and self.generated == len(self.inserts)


class WriteTx:
    """One write transaction. Other modules add their own rows through :attr:`conn`.

    On PostgreSQL nothing is sent until something needs the database: a transaction that only writes (a
    create, an audit event, a Bundle of creates) goes out at its end as one statement on a driver connection
    of the store's own — one statement is atomic by itself, so it needs no BEGIN/COMMIT round trips. The first read,
    lock or statement of another module opens a real transaction (SQLAlchemy, BEGIN … COMMIT) instead.
    """

    def __init__(self, conn: SyncConn | None, is_sqlite: bool, *,
                 opener: Callable[[], Awaitable[AsyncConnection]] | None = None,
                 solo: Callable[[_Pending], Awaitable[None]] | None = None,
                 peek: Callable[[str, str], Awaitable[StoredResource | None]] | None = None) -> None:
        self.is_sqlite = is_sqlite
        #: SQLite: this transaction's writes not yet run (statement, parameters, SQ_* mode), and the
        #: resources they write. They run at its end, or before its first other statement (``_isolate``).
        self._sq: list[tuple[str, Any, int]] = []
        self._sq_keys: set[tuple[str, str]] = set()
        #: SQLite: resources whose ids were just generated (:func:`new_id`): no row can hold them yet.
        self._generated: set[tuple[str, str]] = set()
        #: SQLite: resources whose current version this transaction read (0: none), inside the group's
        #: transaction, which holds SQLite's write lock: nothing else can write them until it commits.
        self._read: dict[tuple[str, str], int] = {}
        #: SQLite: the transaction runs inside its own savepoint (it ran statements besides its own writes).
        self.savepoint = False
        #: SQLite: awaited before a statement of the transaction (set by ``Store.begin``): the group's transaction
        #: is begun, and the writes earlier members left for its commit have run if the statement could see
        #: them — given the resources it is about, only if they wrote one of them (None: any).
        self.ready: Callable[[Iterable[tuple[str, str]] | None], Awaitable[None]] | None = None
        self.after_commit: list[Callable[[], Awaitable[None] | None]] = []
        self.conformance_changed = False
        self._pending: _Pending | None = None
        self._known: dict[tuple[str, str], StoredResource | None] = {}  # locked by prefetch, unchanged since
        self._conditions: set[int] = set()  # PostgreSQL: condition locks held (``lock_condition``)
        self._base: AsyncConnection | SyncConn | None = conn
        self._opener = opener
        self._solo = solo
        #: Optimistic: read the current version without a lock (see ``Store.begin``).
        self._peek = peek
        #: ``await conn.execute(statement[, params])`` on both backends.
        self.conn: SyncConn | _PgTxConn
        if conn is None:  # PostgreSQL: writes are queued, a connection is opened when one is needed
            self._pending = _Pending()
            self.conn = _PgTxConn(self)
        else:
            self.conn = conn
            conn._before = self._isolate

    # ------------------------------------------------------------------ SQLite: buffered writes

    async def _isolate(self) -> None:
        """SQLite: from the first statement besides its own writes (another module's, or a read of a resource
        it wrote) the transaction runs in a savepoint, so that its failure undoes its part of the group alone;
        its buffered writes run first. A create or update never gets here: its writes run with its group's at
        the commit, with no savepoint (see :meth:`end`) — a savepoint copies every page the writes touch."""
        if not self.savepoint:
            if self.ready is not None:
                await self.ready(None)  # outside the savepoint: rolling it back must not undo other members
            self.savepoint = True
            assert isinstance(self._base, SyncConn)
            self._base._raw.execute("SAVEPOINT dhp_member")
        self._run_own()

    def _run_own(self) -> None:
        todo, self._sq = self._sq, []
        self._sq_keys.clear()
        assert isinstance(self._base, SyncConn)
        try:
            run_sqlite_writes(self._base._raw, (todo,))
        except sqlite3.IntegrityError as e:
            raise ConflictError("a resource in this transaction was written concurrently") from e

    async def end(self, deferred: _Deferred) -> None:
        """SQLite, at the transaction's end (under the write lock): its buffered writes go to ``deferred``, the
        group's writes run at its commit. They must not fail there, in the middle of other members' writes:
        unless every row they add to ``resources`` and ``history`` is free (checked here), they run now in a
        savepoint after all, and the one that is not fails this transaction alone."""
        if not self._sq:
            return
        if not self.savepoint:
            if not self._needs_check():
                if not deferred.keys.isdisjoint(self._sq_keys) and self.ready is not None:
                    # It writes what an earlier member left for the commit without having read it (every path
                    # reads first, which runs those; kept safe regardless): theirs run first.
                    await self.ready(self._sq_keys)
                self._defer(deferred)
                return
            if self.ready is not None:
                await self.ready(self._sq_keys)  # the rows earlier members left for the commit count too
            assert isinstance(self._base, SyncConn)
            if self._free(self._base._raw):
                self._defer(deferred)
                return
            self.savepoint = True
            self._base._raw.execute("SAVEPOINT dhp_member")
        self._run_own()

    def _defer(self, deferred: _Deferred) -> None:
        deferred.writes.append(self._sq)
        deferred.keys |= self._sq_keys
        self._sq = []
        self._sq_keys = set()

    def _needs_check(self) -> bool:
        """Whether a buffered row in ``resources`` or ``history`` could be taken: one whose id was not just
        generated (74 random bits: taken only by a bug, and then the insert fails the whole group, which is
        retried — correct, only slower; not worth two lookups on every create), and that is not the next
        version of what this transaction read (an update: that read saw the resource as it is)."""
        generated = self._generated
        read = self._read
        for sql_text, params, _mode in self._sq:
            if sql_text is _SQLITE_INSERT or sql_text is _SQLITE_HISTORY:
                for row in params:
                    key = (row[0], row[1])
                    if key in generated or read.get(key, -1) == row[2] - 1:
                        continue
                    return True
        return False

    def _free(self, raw: sqlite3.Connection) -> bool:
        taken: set[tuple[Any, ...]] = set()
        generated = self._generated
        for sql_text, params, _mode in self._sq:
            if sql_text is not _SQLITE_INSERT and sql_text is not _SQLITE_HISTORY:
                continue  # updates of a row and index rows have no unique key to collide on
            for row in params:
                if (row[0], row[1]) in generated:
                    continue
                if sql_text is _SQLITE_INSERT:
                    key: tuple[Any, ...] = ("r", row[0], row[1])
                    if key in taken or raw.execute(_SQLITE_EXISTS, row[:2]).fetchone() is not None:
                        return False
                else:
                    key = ("h", *row[:3])
                    if key in taken or raw.execute(_SQLITE_VERSION_EXISTS, row[:3]).fetchone() is not None:
                        return False
                taken.add(key)
        return True

    async def _open(self) -> AsyncConnection:
        if self._base is None:
            assert self._opener is not None
            self._base = await self._opener()
        assert isinstance(self._base, AsyncConnection)
        return self._base

    async def connection(self) -> AsyncConnection:
        """The transaction's SQLAlchemy connection (PostgreSQL), opened on first need, queued writes sent."""
        conn = await self._open()
        await self.flush()
        return conn

    async def flush(self) -> None:
        """Send the queued writes (PostgreSQL); a no-op when nothing waits."""
        p = self._pending
        if not p:
            return
        conn = await self._open()
        self._pending = _Pending()
        sql_text, params = flush_statement(p)
        try:
            await conn.exec_driver_sql(sql_text, params)
        except IntegrityError as e:
            raise ConflictError("a resource in this transaction was written concurrently") from e
        except DBAPIError as e:
            if (err := _rewritten(getattr(e.orig, "sqlstate", None))) is not None:
                raise err from e
            raise

    async def prefetch(self, keys: Sequence[tuple[str, str]]) -> None:
        """Read (and on PostgreSQL lock) the current versions of many resources at once; :meth:`current` then
        answers from them. SQLite's reads are in-process and cheap: nothing to gain there."""
        if self._pending is None or not keys:
            return
        conn = await self._open()
        for i in range(0, len(keys), 1000):
            chunk = list(keys[i:i + 1000])
            found = await lock_current(conn, chunk)
            for k in chunk:
                if k not in self._pending.keys:
                    self._known[k] = found.get(k)

    async def current(self, rtype: str, rid: str) -> StoredResource | None:
        if (rtype, rid) in self._known:
            return self._known[(rtype, rid)]
        if isinstance(self.conn, SyncConn):
            if (rtype, rid) in self._sq_keys:
                await self._isolate()
            elif self.ready is not None:
                await self.ready(((rtype, rid),))
            r = self.conn._raw.execute(_SQLITE_CURRENT, (rtype, rid)).fetchone()
            if self.ready is not None:  # in the group's transaction (a bare SyncConn's reads are not)
                self._read[(rtype, rid)] = r[2] if r else 0
            return StoredResource(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6]) if r else None
        if self._pending is not None and (rtype, rid) in self._pending.keys:
            await self.flush()
        if self._peek is not None and self._base is None:
            cur = await self._peek(rtype, rid)
            self._known[(rtype, rid)] = cur
            return cur
        # Straight to the connection: queued writes of other resources need not go out for this read.
        conn = await self._open()
        row = (await conn.execute(_CURRENT_FOR_UPDATE, {"k_type": rtype, "k_id": rid})).first()
        return StoredResource(*row) if row else None

    async def put(self, rec: StoredResource, method: str, *, exists_before: bool,
                  patient: str | None = None, package: str | None = None, generated: bool = False,
                  prev: StoredResource | None = None) -> None:
        """Write ``rec`` as the current version and append it to the history. ``generated``: its id was just
        made by :func:`new_id` for this create. ``prev``: the version read for this write (PostgreSQL: the write
        fails as a conflict if a reindex rewrote the resource's rows since — see ``flush_statement``)."""
        if isinstance(self.conn, SyncConn):
            if generated:
                self._generated.add((rec.type, rec.id))
            sq = self._sq
            deleted = 1 if rec.deleted else 0  # what SQLite stores; a bool would be bound through adaptation
            if exists_before:
                sq.append((_SQLITE_UPDATE, (rec.version, rec.last_updated, deleted, patient, package,
                                            rec.content, rec.index_key, rec.type, rec.id), SQ_EXEC))
            else:
                sq.append((_SQLITE_INSERT, [(rec.type, rec.id, rec.version, rec.last_updated, deleted,
                                             patient, package, rec.content, rec.index_key)], SQ_ROWS))
            sq.append((_SQLITE_HISTORY, [(rec.type, rec.id, rec.version, rec.last_updated, deleted,
                                          method, rec.content)], SQ_ROWS))
            self._sq_keys.add((rec.type, rec.id))
            return
        assert self._pending is not None  # PostgreSQL: queued
        key = (rec.type, rec.id)
        if key in self._pending.keys or key in self._pending.index_keys:
            await self.flush()  # a second write of one resource: the first goes out before it
        self._known.pop(key, None)
        p = self._pending
        row = (rec.type, rec.id, rec.version, rec.last_updated, rec.deleted, patient, package, rec.content,
               rec.index_key)
        if exists_before:
            p.updates.append((*row, prev.index_key if prev is not None else None, prev is not None))
        else:
            p.inserts.append(row)
            if generated:
                p.generated += 1
        p.history.append((rec.type, rec.id, rec.version, rec.last_updated, rec.deleted, method, rec.content))
        p.keys.add(key)
    async def replace_index(self, rtype: str, rid: str, rows: dict[str, list[tuple[Any, ...]]],
                            kinds: Iterable[str], *, fresh: bool,
                            removed: dict[str, list[tuple[Any, ...]]] | None = None) -> None:
        """Change one resource's search index rows: per table kind, tuples of (type, id, code, *values).
        ``kinds``: the tables whose rows of it all go (ignored when ``fresh``: it has none yet); ``removed``:
        single rows that go; then ``rows`` are added."""
        if self._pending is None:
            self._sq += sqlite_index_writes(self.conn, rtype, rid, rows, kinds, fresh=fresh, removed=removed)
            self._sq_keys.add((rtype, rid))
            return
        key = (rtype, rid)
        if key in self._pending.index_keys:
            await self.flush()
        p = self._pending
        p.index_keys.add(key)
        if not fresh:
            for k in kinds:
                p.index_deletes.setdefault(k, []).append(key)
        for k, lst in (removed or {}).items():
            if lst:
                p.index_removed.setdefault(k, []).extend(lst)
        for k, lst in rows.items():
            if lst:
                p.index_rows.setdefault(k, []).extend(lst)

    async def insert_index(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """Add search index rows (per table kind, tuples of (type, id, code, *values)) of resources that have
        none yet; on PostgreSQL they are queued and sent with the transaction's other writes."""
        if self._pending is None:
            self._sq += sqlite_index_writes(self.conn, "", "", rows, (), fresh=True)
            self._sq_keys.update((r[0], r[1]) for lst in rows.values() for r in lst)
            return
        p = self._pending
        for k, lst in rows.items():
            if lst:
                p.index_rows.setdefault(k, []).extend(lst)
                p.index_keys.update((r[0], r[1]) for r in lst)

    async def lock_condition(self, rtype: str, params: Sequence[tuple[str, str]]) -> None:
        """Serialize, until this transaction ends, with every other transaction locking the same ``rtype`` and
        conditional search ``params`` (conditional create): without it two PostgreSQL transactions both find no
        match under READ COMMITTED and both create. SQLite needs nothing: writers run one at a time (BEGIN
        IMMEDIATE), and a group's members see the earlier members' rows."""
        await self.lock_conditions([(rtype, params)])

    async def lock_conditions(self, conditions: Iterable[tuple[str, Sequence[tuple[str, str]]]]) -> None:
        """:meth:`lock_condition` for several conditions at once, taken in one global order: two transactions
        naming the same conditions in different orders (a Bundle's entries) then never hold one each while
        waiting for the other's."""
        if self._pending is None:
            return
        keys = sorted({_condition_key(rtype, params) for rtype, params in conditions} - self._conditions)
        if not keys:
            return
        # The subquery's order is the order the locks are taken in.
        await self.conn.exec_driver_sql(
            "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT unnest($1::bigint[]) AS k ORDER BY 1) AS s",
            (keys,))
        self._conditions.update(keys)

    async def bump(self, name: str) -> None:
        n = await self.conn.execute(update(counters).where(counters.c.name == name)
                                    .values(value=counters.c.value + 1))
        if n.rowcount == 0:
            await self.conn.execute(insert(counters).values(name=name, value=1))

    def mark_conformance_changed(self) -> None:
        self.conformance_changed = True

    async def before_commit(self) -> None:
        if self._base is None and not self.conformance_changed:
            # Nothing was read or locked: the queued writes go out as one statement, no transaction needed.
            p, self._pending = self._pending, None  # done: a later put would be lost, so it fails
            if p and self._solo is not None:
                await self._solo(p)
            return
        await self.flush()
        if self.conformance_changed:
            await self.bump(CONFORMANCE_EPOCH)

    async def committed(self) -> None:
        """Run the callbacks registered for after the commit (cache reloads and the like)."""
        for fn in self.after_commit:
            r = fn()
            if r is not None:
                await r


#: SQLite memory-maps up to this many bytes of the database file (reads skip a copy per page).
SQLITE_MMAP = 1 << 30
#: Page cache of the SQLite writer connection, KiB.
SQLITE_WRITER_CACHE_KIB = 65536
#: PostgreSQL primary-key reads on the wire at once per process; reads arriving meanwhile are batched. Two,
#: not four: under load a third and fourth read went out alone, a round trip each, where waiting put them in
#: the next batch (reads 0.62–0.65 → 0.71–0.72 of the ceiling; docs/benchmarks.md, ninth session).
PG_READS_IN_FLIGHT = 2
PG_READ_BATCH = 256
#: PostgreSQL write-only statements on the wire at once per process; transactions that finish meanwhile are
#: merged into the next statement (group commit), at most PG_WRITE_GROUP of them. One: each statement costs
#: both processes a fixed price (driver, protocol, PostgreSQL's per-table work) that a group shares; with two on
#: the wire, groups stayed near one transaction and creates cost ~10 % more CPU on both sides (docs/benchmarks.md).
PG_WRITES_IN_FLIGHT = 1
PG_WRITE_GROUP = 64
#: Most write transactions that share one SQLite commit (group commit).
GROUP_MAX = 64
#: Longest a SQLite group stays open for writers still joining it, seconds (see ``Store._flush``).
GROUP_WAIT = 0.01
#: Seconds between background WAL checkpoints while writes go on.
CHECKPOINT_EVERY = 0.5


@dataclass
class _Deferred:
    """Writes of a group's members left for its commit, and the resources they write."""

    writes: list[list[tuple[str, Any, int]]]
    keys: set[tuple[str, str]]


@dataclass
class _Group:
    """SQLite write transactions that will be committed together: one BEGIN IMMEDIATE … COMMIT."""

    conn: Connection
    done: asyncio.Future[None]
    #: Its transaction, begun by the first member that runs a statement, else by the commit.
    trans: Any = None
    members: int = 0
    flushing: bool = False
    #: Members' buffered writes, left for the commit (``WriteTx.end``).
    deferred: _Deferred = field(default_factory=lambda: _Deferred([], set()))


@dataclass
class GroupCommits:
    commits: int = 0
    members: int = 0


class _Begin:
    """``Store.begin()``: a class, not an ``asynccontextmanager`` — every create and update enters one, and an
    async generator costs each a generator, the event loop's async-generator bookkeeping (a weak set entry)
    and two resumptions."""

    __slots__ = ("_group", "_optimistic", "_stack", "_store", "_sync", "_tx")

    def __init__(self, store: Store, optimistic: bool) -> None:
        self._store = store
        self._optimistic = optimistic
        self._group: _Group | None = None
        self._sync: SyncConn | None = None
        #: PostgreSQL: closes the SQLAlchemy connection, once a statement needed one.
        self._stack: contextlib.AsyncExitStack | None = None
        self._tx: WriteTx | None = None

    async def __aenter__(self) -> WriteTx:
        store = self._store
        if store._sqlite_writer is not None:
            lock = store._write_lock
            assert lock is not None
            await lock.acquire()
            try:
                group = store._group
                if group is None:
                    group = store._group = _Group(store._writer(), asyncio.get_running_loop().create_future())
                sc = self._sync = SyncConn(group.conn)
                tx = self._tx = WriteTx(sc, True)
                tx.ready = functools.partial(store._ready, group)
                self._group = group
            except BaseException:
                lock.release()
                raise
            return tx
        # Most transactions are write-only and never open a SQLAlchemy connection: the exit stack that
        # closes one exists only once one is opened.
        tx = self._tx = WriteTx(None, False, opener=self._open, solo=store._pg_solo,
                                peek=store._pg_current if self._optimistic else None)
        return tx

    async def _open(self) -> AsyncConnection:
        self._stack = stack = contextlib.AsyncExitStack()
        conn = await stack.enter_async_context(self._store.engine.connect())
        await stack.enter_async_context(conn.begin())
        return conn

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None, tb: Any) -> None:
        tx = self._tx
        assert tx is not None
        try:
            if self._group is not None:
                await self._end_sqlite(tx, self._group, e)
            else:
                try:
                    await self._end_pg(tx, e)
                    if isinstance(e, DBAPIError):
                        raise e
                except DBAPIError as err:
                    # PostgreSQL undid the transaction (deadlock, serialization failure: SQLSTATE class 40):
                    # retryable.
                    if str(getattr(err.orig, "sqlstate", "")).startswith("40"):
                        raise ConflictError("concurrent writers got in each other's way") from err
                    raise
            if e is None:
                await tx.committed()
        finally:
            # The transaction and its connection refer to each other (SQLite: the connection's isolation hook is
            # a method of the transaction; PostgreSQL: the transaction's opener is a method of this object).
            # Undone here, a write's dozen objects go with their last reference; as a cycle they waited for the
            # collector, whose young-generation passes took ~9 ms each under load.
            if self._sync is not None:
                self._sync._before = None
            elif isinstance(tx.conn, _PgTxConn):
                tx.conn._tx = None
            tx._opener = None
            tx.ready = None

    async def _end_sqlite(self, tx: WriteTx, group: _Group, e: BaseException | None) -> None:
        store = self._store
        sc = self._sync
        assert sc is not None and store._write_lock is not None
        # One member's failure must leave the others' work in the group. Its own writes are buffered and run at
        # the commit, so failing before then undoes nothing; a member that runs other statements first opens a
        # savepoint (WriteTx._isolate, issued through the driver: SQLAlchemy's nested-transaction bookkeeping
        # cost more than SQLite).
        try:
            if e is not None:
                if tx.savepoint:
                    store._rollback_member(group, sc._raw)
                return  # the body's exception goes on
            try:
                await tx.before_commit()
                try:
                    await tx.end(group.deferred)
                except BaseException as err:
                    if not tx.savepoint:
                        # Half run and no savepoint (the lock makes a conflict here impossible; this is an I/O
                        # error or the like): the whole group goes, every member retries.
                        store._fail_group(group, ConflictError(f"a group commit failed: {err}"))
                    raise
            except BaseException:
                if tx.savepoint:
                    store._rollback_member(group, sc._raw)
                raise
            if tx.savepoint:
                sc._raw.execute("RELEASE dhp_member")
            group.members += 1
        finally:
            store._end_member(group)
            store._write_lock.release()
        # The commit is shared with the writers queued behind this one; wait for it.
        await asyncio.shield(group.done)

    async def _end_pg(self, tx: WriteTx, e: BaseException | None) -> None:
        if e is None:
            try:
                await tx.before_commit()
            except BaseException as err:
                if self._stack is not None:
                    await self._stack.__aexit__(type(err), err, err.__traceback__)  # rolls back; never swallows
                raise
            if self._stack is not None:
                await self._stack.__aexit__(None, None, None)  # commits
        elif self._stack is not None:
            await self._stack.__aexit__(type(e), e, e.__traceback__)


class Store:
    def __init__(self, url: str, read_url: str = "") -> None:
        self.url = url
        self.read_url = read_url or url
        self.sqlite_path = _sqlite_path(url)
        self.is_sqlite = self.sqlite_path is not None
        self.engine: AsyncEngine
        self.read_engine: AsyncEngine
        self._sqlite_reader: sqlite3.Connection | None = None
        #: The background checkpoints' connection, kept: a new one would read (parse) the schema every time.
        self._checkpointer: sqlite3.Connection | None = None
        self._sqlite_writer: Engine | None = None
        self._write_lock: asyncio.Lock | None = None
        self._writer_conn: Connection | None = None
        self._group: _Group | None = None
        #: SQLite group commits so far and the write transactions they carried (operators and tests).
        self.group_commits = GroupCommits()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._checkpointing = False
        self._checkpoint_tail = False
        self._last_checkpoint = 0.0
        #: Connections for write-only statements (see _OwnedConnections); reads by id, on the server that
        #: serves reads and on the primary (the same object without a replica).
        self._pg_writers: _OwnedConnections | None = None
        self._pg_reads: _BatchedReads | None = None
        self._pg_primary_reads: _BatchedReads | None = None
        self._writes_in_flight = 0
        self._write_queue: list[tuple[_Pending, asyncio.Future[None]]] = []
        #: Resources written by statements on the wire (how many statements each): see _drain_writes.
        self._keys_in_flight: dict[tuple[str, str], int] = {}
        #: Version each resource last got from an update statement of this process (see _outdated_by).
        self._updated: dict[tuple[str, str], int] = {}
        self._opened = False

    # ------------------------------------------------------------------ lifecycle

    async def open(self, migrate: bool = True) -> None:
        if self._opened:
            return
        if self.is_sqlite:
            assert self.sqlite_path is not None
            if self.sqlite_path != ":memory:":
                Path(self.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_async_engine(self.url, pool_size=1, max_overflow=0, pool_timeout=60,
                                              connect_args={"timeout": 60})
            self.read_engine = create_async_engine(self.url, pool_size=4, max_overflow=4,
                                                   connect_args={"timeout": 60})
            _sqlite_setup(self.engine, immediate=True)
            _sqlite_setup(self.read_engine, immediate=False)
            self._sqlite_writer = create_engine(f"sqlite:///{self.sqlite_path}", pool_size=1, max_overflow=0,
                                                # Index inserts are one statement per table and row count
                                                # (dhp.store.search.sqlite_index_writes): keep more prepared.
                                                connect_args={"timeout": 60, "check_same_thread": False,
                                                              "cached_statements": 512})
            _sqlite_setup(self._sqlite_writer, immediate=True)
            self._write_lock = asyncio.Lock()
        else:
            self.engine = create_async_engine(self.url, pool_size=10, max_overflow=10, pool_pre_ping=False)
            self.read_engine = (create_async_engine(self.read_url, pool_size=10, max_overflow=10)
                                if self.read_url != self.url else self.engine)
        if migrate:
            await self.migrate()
        if not self.is_sqlite:
            # Write-only transactions go straight to the driver (WriteTx): on the primary.
            self._pg_writers = _OwnedConnections(self.url, PG_WRITES_IN_FLIGHT)
            self._pg_reads = _BatchedReads(self.read_url, self._spawn)
            self._pg_primary_reads = (self._pg_reads if self.read_url == self.url
                                      else _BatchedReads(self.url, self._spawn))
        self._opened = True

    async def close(self) -> None:
        if self._write_lock is not None:
            async with self._write_lock:
                if self._group is not None:
                    self._commit_group(self._group)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._writer_conn is not None:
            with contextlib.suppress(Exception):
                self._writer_conn.connection.driver_connection.execute(  # type: ignore[union-attr]
                    "PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._writer_conn.close()
            self._writer_conn = None
        if self._sqlite_reader is not None:
            self._sqlite_reader.close()
            self._sqlite_reader = None
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._pg_writers is not None:
            await self._pg_writers.close()
        for reads in (self._pg_reads, self._pg_primary_reads):
            if reads is not None:
                await reads.conns.close()  # twice without a replica: the second finds nothing idle
        if self._sqlite_writer is not None:
            self._sqlite_writer.dispose()
            self._sqlite_writer = None
        if self._opened:
            await self.engine.dispose()
            if self.read_engine is not self.engine:
                await self.read_engine.dispose()
        self._opened = False

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (every branch head)."""
        from dhp.store.migrate import upgrade

        async with self.engine.begin() as conn:
            await conn.run_sync(upgrade)

    def begin(self, optimistic: bool = False) -> _Begin:
        """A write transaction (``async with store.begin() as tx``): committed when the block ends, rolled back
        on any exception.

        ``optimistic`` (PostgreSQL): :meth:`WriteTx.current` reads without taking a lock — two round trips
        for an update instead of four. A write on top of a version another writer replaced meanwhile still
        cannot be lost: both write version n+1, and history's unique (type, id, version) refuses the second
        one as a whole (:class:`ConflictError`). Meant for a first attempt; a retry after a conflict locks.
        """
        return _Begin(self, optimistic)

    async def _pg_solo(self, p: _Pending) -> None:
        """Send a write-only transaction's queued writes: one autocommitted statement through the driver.

        Group commit: with :data:`PG_WRITES_IN_FLIGHT` statements already on the wire, transactions that
        finish meanwhile wait and go out together as one statement. Each table a statement writes costs
        PostgreSQL a fixed price (locks, opening the table and its indexes) that a single create's few index
        rows do not outweigh; a group shares it. A group that fails on a conflict is sent again member by
        member, so one writer's conflict never fails another's write.
        """
        if p.updates and self._updated and self._stale(p.updates, self._updated):
            raise ConflictError("a resource in this transaction was written concurrently")
        if (self._writes_in_flight < PG_WRITES_IN_FLIGHT and not self._write_queue
                and self._keys_in_flight.keys().isdisjoint(p.touched())):
            self._writes_in_flight += 1
            self._fly(p, 1)
            ok = False
            try:
                await self._pg_send(p)
                ok = True
            finally:
                self._fly(p, -1)
                self._writes_in_flight -= 1
                if ok:
                    self._outdated_by(p)
                self._drain_writes()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._write_queue.append((p, fut))
        self._drain_writes()
        await fut

    def _fly(self, p: _Pending, step: int) -> None:
        for k in p.touched():
            n = self._keys_in_flight.get(k, 0) + step
            if n:
                self._keys_in_flight[k] = n
            else:
                self._keys_in_flight.pop(k, None)

    def _outdated_by(self, *sent: _Pending) -> None:
        """``sent`` is committed: a transaction writing one of its resources at a version not above the one just
        written read it before this commit, and would fail in the database (history's unique version) — taking
        every transaction merged with it down to one-by-one re-sends. It fails here instead, without a round
        trip, and is retried (``interactions.crud._in_tx``): now if it is queued; an update also when it is
        handed to :meth:`_pg_solo` later (its read may have crossed this commit on the wire)."""
        updated = {(r[0], r[1]): r[2] for q in sent for r in q.updates}
        if updated:
            if len(self._updated) > 10_000:  # forgetting only leaves the refusal to the database
                self._updated.clear()
            self._updated.update(updated)
        if not self._write_queue:
            return
        written = {(r[0], r[1]): r[2] for q in sent if not q.fresh() for r in q.inserts}
        written.update(updated)
        if not written:
            return
        for p, fut in self._write_queue:
            if not fut.done() and not p.fresh() and self._stale((*p.inserts, *p.updates), written):
                _settle(fut, ConflictError("a resource in this transaction was written concurrently"))

    @staticmethod
    def _stale(rows: Iterable[tuple[Any, ...]], written: dict[tuple[str, str], int]) -> bool:
        for r in rows:
            v = written.get((r[0], r[1]))
            if v is not None and r[2] <= v:
                return True
        return False

    def _drain_writes(self) -> None:
        while self._write_queue and self._writes_in_flight < PG_WRITES_IN_FLIGHT:
            group: list[tuple[_Pending, asyncio.Future[None]]] = []
            # A resource a statement on the wire writes waits for its outcome (see _outdated_by).
            taken: set[tuple[str, str]] = set(self._keys_in_flight)
            rest = []
            for item in self._write_queue:
                p, fut = item
                if fut.done():  # its caller was cancelled: the transaction is abandoned, nothing is sent
                    continue
                keys = p.touched()
                # Two writes of one resource never share a statement (the second must see the first).
                if len(group) < PG_WRITE_GROUP and taken.isdisjoint(keys):
                    group.append(item)
                    taken |= keys
                else:
                    rest.append(item)
            self._write_queue = rest
            if not group:
                return
            self._writes_in_flight += 1
            for p, _f in group:
                self._fly(p, 1)
            self._spawn(self._send_group(group))

    async def _send_group(self, group: list[tuple[_Pending, asyncio.Future[None]]]) -> None:
        landed = False

        def land() -> None:
            """The statement is done: the next group may go on the wire."""
            nonlocal landed
            if not landed:
                landed = True
                for p, _f in group:
                    self._fly(p, -1)
                self._writes_in_flight -= 1
                self._drain_writes()

        try:
            single = len(group) == 1
            try:
                await self._pg_send(group[0][0] if single else _merge(p for p, _f in group))
            except Exception as e:
                if single:
                    _settle(group[0][1], e)
                    return
                # Whatever failed — a conflict, a value the database refused — is one member's: each goes
                # again on its own and gets its own outcome.
                for p, fut in group:
                    await self._send_one(p, fut)
            else:
                self._outdated_by(*(p for p, _f in group))
                # A group of creates under new ids: the next group goes on the wire before its writers resume
                # (they are woken after it is sent), so the database works on it while they answer their
                # clients — creates of the search mix +15 % over HTTP. Not after updates: their writers' next
                # requests begin with reads, which on a 2-core machine then compete with the early statement
                # (updates −1 to −26 %, median −10 %, in seven pairs; docs/benchmarks.md).
                if all(p.fresh() for p, _f in group):
                    land()
                for _p, fut in group:
                    _settle(fut, None)
        except BaseException:  # cancelled (shutdown): nobody may wait forever
            for _p, fut in group:
                _settle(fut, ConnectionError("the write was cancelled"))
            raise
        finally:
            land()

    async def _send_one(self, p: _Pending, fut: asyncio.Future[None]) -> None:
        try:
            await self._pg_send(p)
        except Exception as e:
            _settle(fut, e)
        else:
            _settle(fut, None)
            self._outdated_by(p)

    async def _pg_send(self, p: _Pending) -> None:
        import asyncpg

        sql_text, params = flush_statement(p)
        assert self._pg_writers is not None
        try:
            await self._pg_writers.run(lambda c: c.execute(sql_text, *params))
        except asyncpg.IntegrityConstraintViolationError as e:
            raise ConflictError("a resource in this transaction was written concurrently") from e
        except asyncpg.TransactionRollbackError as e:  # deadlock, serialization failure: PostgreSQL
            raise ConflictError("concurrent writers got in each other's way") from e  # undid it all
        except asyncpg.PostgresError as e:
            if (err := _rewritten(getattr(e, "sqlstate", None))) is not None:
                raise err from e
            raise

    async def _pg_current(self, rtype: str, rid: str) -> StoredResource | None:
        """The current version as the primary has it now (no lock: see ``begin(optimistic=True)``), read with
        the primary's other reads by id (the same reads as :meth:`read` without a replica)."""
        assert self._pg_primary_reads is not None
        return await self._pg_primary_reads.read(rtype, rid)

    # ------------------------------------------------------------------ SQLite group commit

    def _writer(self) -> Connection:
        if self._writer_conn is None:
            assert self._sqlite_writer is not None
            self._writer_conn = self._sqlite_writer.connect()
            # Checkpoints run in the background (see _maybe_checkpoint), not inside a writer's commit.
            raw = self._writer_conn.connection.driver_connection
            raw.execute("PRAGMA wal_autocheckpoint=0")  # type: ignore[union-attr]
            raw.execute("PRAGMA journal_size_limit=67108864")  # type: ignore[union-attr]
        return self._writer_conn

    def _rollback_member(self, group: _Group, raw: sqlite3.Connection) -> None:
        try:
            raw.execute("ROLLBACK TO dhp_member")
            raw.execute("RELEASE dhp_member")
        except Exception as e:  # the whole transaction is gone (I/O error…): fail every member
            self._fail_group(group, e)

    async def _ready(self, group: _Group, keys: Iterable[tuple[str, str]] | None) -> None:
        """A member of ``group`` is about to run a statement (see ``WriteTx.ready``; it holds the write lock)."""
        if self._group is not group:
            raise ConflictError("a group commit failed")  # failed under an earlier statement: it retries
        if group.trans is None:
            group.trans = group.conn.begin()
        d = group.deferred
        if d.writes and (keys is None or not d.keys.isdisjoint(keys)):
            try:
                self._run_deferred(group)
            except Exception as e:
                # The lock makes a conflict impossible: an I/O error or the like. The whole group goes.
                error = ConflictError(f"a group commit failed: {e}")
                self._fail_group(group, error)
                raise error from e

    @staticmethod
    def _run_deferred(group: _Group) -> None:
        d = group.deferred
        todo = d.writes[:]
        d.writes.clear()  # in place: a member about to add to them holds them
        d.keys.clear()
        run_sqlite_writes(group.conn.connection.driver_connection, todo)  # type: ignore[arg-type]

    def _end_member(self, group: _Group) -> None:
        """A member is done (its savepoint released or rolled back): commit now, or after the queue drains."""
        if self._group is not group:
            return
        if group.members >= GROUP_MAX:
            self._commit_group(group)
        elif not group.flushing:
            # The flush queues on the lock behind the writers already waiting: they join this commit.
            group.flushing = True
            self._spawn(self._flush(group))

    async def _flush(self, group: _Group) -> None:
        assert self._write_lock is not None
        # Writers already on their way join first: the group stays open while each two passes of the event
        # loop bring it members (a request read in one pass reaches its write in the next). Under load a
        # group so holds every write in flight, not the few of one pass: most index rows of a commit land
        # on pages another member's rows dirty too, and SQLite writes each dirty page to the WAL once per
        # commit. A lone writer waits two passes.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GROUP_WAIT
        seen = 0
        while group.members != seen and self._group is group and loop.time() < deadline:
            seen = group.members
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        async with self._write_lock:
            if self._group is group:
                self._commit_group(group)

    def _commit_group(self, group: _Group) -> None:
        """Commit ``group`` (the caller holds the write lock): the writes its members left run now, each table's
        new rows of the whole group together in multi-row INSERTs (``run_sqlite_writes``): SQLite's cost per
        statement run was as much again as its work per row when each member ran its own."""
        self._group = None
        try:
            if group.trans is None:
                group.trans = group.conn.begin()
        except Exception as e:  # locked beyond the busy timeout by another process: an outage (503)
            self._fail_group(group, e)
            return
        try:
            self._run_deferred(group)
        except Exception as e:  # the lock makes a conflict impossible: an I/O error or the like
            self._fail_group(group, ConflictError(f"a group commit failed: {e}"))  # every member retries
            return
        try:
            group.trans.commit()
        except Exception as e:
            self._fail_group(group, e)
            return
        self.group_commits.commits += 1
        self.group_commits.members += group.members
        group.done.set_result(None)
        self._maybe_checkpoint()

    def _fail_group(self, group: _Group, error: Exception) -> None:
        if self._group is group:
            self._group = None
        group.deferred.writes.clear()
        group.deferred.keys.clear()
        if group.trans is not None:
            with contextlib.suppress(Exception):
                group.trans.rollback()
        if not group.done.done():
            group.done.set_exception(error)
            group.done.exception()  # members that failed on their own never look at it

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _maybe_checkpoint(self) -> None:
        """Keep the WAL short without making writers wait for the copy.

        A checkpoint thread copies the WAL into the database file while writes go on (PASSIVE). Writes that
        landed meanwhile keep it from finishing, so the WAL could never restart from its beginning and would
        grow without bound; after each background pass the writer itself checkpoints the remainder (short)
        between two groups, and the next write starts the WAL afresh.
        """
        if self._checkpoint_tail and not self._checkpointing:
            self._checkpoint_tail = False
            with contextlib.suppress(sqlite3.Error):
                self._writer().connection.driver_connection.execute(  # type: ignore[union-attr]
                    "PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        now = time.monotonic()
        if self._checkpointing or now - self._last_checkpoint < CHECKPOINT_EVERY:
            return
        self._checkpointing = True
        self._last_checkpoint = now
        self._spawn(self._checkpoint())

    async def _checkpoint(self) -> None:
        """Copy the WAL back into the database file on a thread (SQLite releases the GIL while it works)."""
        path = self.sqlite_path
        assert path is not None

        def run() -> None:
            # One checkpoint at a time (``_checkpointing``), so the connection is never shared between threads.
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(path, timeout=30, isolation_level=None,
                                                     check_same_thread=False)
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

        try:
            await asyncio.to_thread(run)
            self._checkpoint_tail = True
        except sqlite3.Error as e:
            import logging

            logging.getLogger(__name__).warning("WAL checkpoint failed: %s", e)
        finally:
            self._checkpointing = False

    @contextlib.asynccontextmanager
    async def read_conn(self) -> AsyncIterator[AsyncConnection]:
        async with self.read_engine.connect() as conn:
            yield conn

    # ------------------------------------------------------------------ reads

    def _sqlite(self) -> sqlite3.Connection:
        if self._sqlite_reader is None:
            assert self.sqlite_path is not None
            c = sqlite3.connect(self.sqlite_path, check_same_thread=False, timeout=30,
                                isolation_level=None)
            c.execute("PRAGMA query_only=ON")
            c.execute(f"PRAGMA mmap_size={SQLITE_MMAP}")
            self._sqlite_reader = c
        return self._sqlite_reader

    async def read(self, rtype: str, rid: str) -> StoredResource | None:
        """Current version (deleted ones too). The hot path: one primary-key fetch through the driver."""
        if self.is_sqlite:
            # A WAL read of one row takes microseconds: cheaper than a hop to aiosqlite's thread.
            row = self._sqlite().execute(
                "SELECT type, id, version, last_updated, deleted, content FROM resources "
                "WHERE type = ? AND id = ?", (rtype, rid)).fetchone()
            return StoredResource(row[0], row[1], row[2], row[3], bool(row[4]), row[5]) if row else None
        assert self._pg_reads is not None
        return await self._pg_reads.read(rtype, rid)

    async def vread(self, rtype: str, rid: str, version: int) -> tuple[StoredResource, str] | None:
        q = select(history.c.type, history.c.id, history.c.version, history.c.last_updated,
                   history.c.deleted, history.c.content, history.c.method).where(
            history.c.type == rtype, history.c.id == rid, history.c.version == version)
        async with self.read_conn() as conn:
            row = (await conn.execute(q)).first()
        return (StoredResource(*row[:6]), row[6]) if row else None

    async def exists(self, rtype: str, rid: str) -> bool:
        rec = await self.read(rtype, rid)
        return rec is not None and not rec.deleted

    async def history(self, rtype: str | None = None, rid: str | None = None, *, since: int | None = None,
                      at: tuple[int, int] | None = None, count: int = 50, offset: int = 0,
                      max_seq: int | None = None, want_total: bool = True) -> HistoryPage:
        """Versions newest first. ``at`` is a (low, high) range in microseconds: versions current at some
        point in it. ``max_seq`` pins a paging session so concurrent writes do not shift pages."""
        conds = []
        if rtype:
            conds.append(history.c.type == rtype)
        if rid:
            conds.append(history.c.id == rid)
        if since is not None:
            conds.append(history.c.last_updated >= since)
        if at is not None:
            low, high = at
            later = history.alias("later")
            conds.append(history.c.last_updated < high)
            conds.append(~exists().where(and_(later.c.type == history.c.type, later.c.id == history.c.id,
                                              later.c.version > history.c.version,
                                              later.c.last_updated <= low)))
        async with self.read_conn() as conn:
            if max_seq is None:
                max_seq = (await conn.execute(select(func.coalesce(func.max(history.c.seq), 0)))).scalar_one()
            # One instance's versions are read along uq_history_version: "seq + 0" keeps SQLite's planner
            # (which has no statistics) from scanning the type's whole history through ix_history_type_seq.
            conds.append((history.c.seq + literal_column("0") if rid else history.c.seq) <= max_seq)
            where = and_(*conds)
            total = -1
            if want_total:
                total = (await conn.execute(select(func.count()).select_from(history).where(where))).scalar_one()
            q = (select(history.c.type, history.c.id, history.c.version, history.c.last_updated,
                        history.c.deleted, history.c.content, history.c.method)
                 # One instance's versions: newest first by version, along uq_history_version (seq orders
                 # them the same way; its index would cost every write).
                 .where(where).order_by(history.c.version.desc() if rid else history.c.seq.desc())
                 .limit(count).offset(offset))
            rows = (await conn.execute(q)).all()
        return HistoryPage([(StoredResource(*r[:6]), r[6]) for r in rows], total, int(max_seq))

    async def list_current(self, rtype: str, *, include_deleted: bool = False, limit: int | None = None,
                           offset: int = 0) -> list[StoredResource]:
        q = select(resources.c.type, resources.c.id, resources.c.version, resources.c.last_updated,
                   resources.c.deleted, resources.c.content).where(resources.c.type == rtype)
        if not include_deleted:
            q = q.where(resources.c.deleted == literal(False))
        q = q.order_by(resources.c.id).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        async with self.read_conn() as conn:
            return [StoredResource(*r) for r in (await conn.execute(q)).all()]

    async def count(self, rtype: str | None = None) -> int:
        q = select(func.count()).select_from(resources).where(resources.c.deleted == literal(False))
        if rtype:
            q = q.where(resources.c.type == rtype)
        async with self.read_conn() as conn:
            return int((await conn.execute(q)).scalar_one())

    # ------------------------------------------------------------------ conformance

    async def counter(self, name: str) -> int:
        async with self.read_conn() as conn:
            v = (await conn.execute(select(counters.c.value).where(counters.c.name == name))).scalar()
        return int(v or 0)

    async def conformance_epoch(self) -> int:
        return await self.counter(CONFORMANCE_EPOCH)

    async def api_resources_of_types(self, types: Iterable[str]) -> list[bytes]:
        """Content of live resources of these types that were written through the API (not packages)."""
        q = select(resources.c.content).where(resources.c.type.in_(list(types)),
                                              resources.c.package.is_(None),
                                              resources.c.deleted == literal(False))
        async with self.read_conn() as conn:
            return [r[0] for r in (await conn.execute(q)).all()]

    async def installed_package_refs(self) -> set[str]:
        async with self.read_conn() as conn:
            return {r[0] for r in (await conn.execute(select(installed_packages.c.ref))).all()}

    async def install_package(self, ref: str, items: Sequence[tuple[str, str, bytes, str | None]],
                              index: Callable[[WriteTx, list[tuple[str, str, bytes]]], Awaitable[None]]
                              | None = None, ts: int | None = None) -> int:
        """Store a package's resources (type, id, content, patient) as version 1, skipping ids taken.

        Returns how many were stored. ``index`` may add search rows in the same transaction.
        """
        ts = ts or now_us()
        async with self.begin() as tx:
            taken: set[tuple[str, str]] = set()
            for t in sorted({i[0] for i in items}):
                rows = await tx.conn.execute(select(resources.c.id).where(resources.c.type == t))
                taken |= {(t, r[0]) for r in rows}
            fresh = []
            for t, i, c, p in items:
                if (t, i) not in taken:
                    taken.add((t, i))
                    fresh.append((t, i, c, p))
            for chunk in _chunks(fresh, 500):
                await tx.conn.execute(insert(resources), [
                    {"type": t, "id": i, "version": 1, "last_updated": ts, "deleted": False, "patient": p,
                     "package": ref, "content": c} for t, i, c, p in chunk])
                await tx.conn.execute(insert(history), [
                    {"type": t, "id": i, "version": 1, "last_updated": ts, "deleted": False, "method": "POST",
                     "content": c} for t, i, c, _ in chunk])
                if index is not None:
                    await index(tx, [(t, i, c) for t, i, c, _ in chunk])
            await tx.conn.execute(insert(installed_packages).values(ref=ref, installed_at=ts,
                                                                   resources=len(fresh)))
            tx.mark_conformance_changed()
        return len(fresh)

    async def wipe(self) -> None:
        """Delete all data (tests and `dhp db reset`)."""
        self._updated.clear()
        async with self.begin() as tx:
            for t in reversed(metadata.sorted_tables):
                await tx.conn.execute(delete(t))


def _chunks(seq: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _sqlite_setup(engine: AsyncEngine | Engine, immediate: bool) -> None:
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync_engine, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        # Take transaction control from the driver so we can say BEGIN IMMEDIATE ourselves.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        # Map the file instead of copying pages through read() calls; the writer also keeps a larger cache
        # (its index inserts land on pages all over the B-trees).
        cur.execute(f"PRAGMA mmap_size={SQLITE_MMAP}")
        if immediate:
            cur.execute(f"PRAGMA cache_size=-{SQLITE_WRITER_CACHE_KIB}")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


#: SQLSTATEs of a database that cannot serve now: connection failures (08…), too many connections, shutting
#: down or starting up (57P01–57P03).
_UNAVAILABLE_STATES = ("08", "53300", "57P01", "57P02", "57P03")
#: OSError numbers of an unreachable peer (a missing file is not an outage).
_NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                             errno.ENETUNREACH, errno.EPIPE})


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the database cannot be reached or is not serving now — an
    outage to answer with 503, not a bug: refused or dropped connections, a server shutting down or starting,
    no connection slots left, SQLite locked beyond its busy timeout."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        seen += 1
        if isinstance(e, ConnectionError | TimeoutError) or (
                isinstance(e, OSError) and e.errno in _NETWORK_ERRNOS):
            return True
        state = str(getattr(e, "sqlstate", "") or "")
        if state.startswith(_UNAVAILABLE_STATES):
            return True
        if type(e).__name__ in ("ConnectionDoesNotExistError", "InternalClientError") or (
                type(e).__name__ == "InterfaceError" and "closed" in str(e)):
            return True  # asyncpg: the connection died under the statement
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            return True
        if isinstance(e, DBAPIError) and e.connection_invalidated:
            return True
        e = e.__cause__ or e.__context__
    return False


def unstorable_value(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is PostgreSQL refusing a value: a character its text type cannot
    hold (U+0000, SQLSTATE 22021/22P05) or text longer than its column (22001; SQLite does not check lengths).
    Bad input to answer with 400, found where the value meets the database: the statement changed nothing."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 10:
        seen += 1
        if str(getattr(e, "sqlstate", "") or "") in ("22021", "22P05", "22001"):
            return True
        e = e.__cause__ or e.__context__
    return False


async def retry_conflicts(fn: Callable[[], Awaitable[Any]], attempts: int = 5) -> Any:
    """Run ``fn`` again when a concurrent writer took a key first (or SQLite stayed locked)."""
    for i in range(attempts):
        try:
            return await fn()
        except (ConflictError, OperationalError) as e:
            if i == attempts - 1 or (isinstance(e, OperationalError) and "locked" not in str(e)):
                raise
            await asyncio.sleep(0.01 * (i + 1))
    raise AssertionError("unreachable")


__all__ += ["SyncConn", "retry_conflicts", "unavailable", "unstorable_value"]

# The index tables' SQL reads the search package's definitions, which import this module: bound last, once
# everything here exists (a function-level import costs every create a lookup through the import system).
from dhp.store.search import flush_statement, lock_current, sqlite_index_writes  # noqa: E402
