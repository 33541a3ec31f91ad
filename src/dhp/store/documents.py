"""Tables and SQL of clinical documents (``dhp.documents``). Migration ``0700_documents`` creates them.

``documents`` keeps, per stored document Bundle, the exact bytes the client submitted (the legal record),
its identity (``Bundle.identifier`` — unique — and ``Composition.identifier``, stable across versions), its
life-cycle state and the DocumentReference that indexes it. ``document_resources`` maps each Bundle entry
(by fullUrl) to the atomic resource it was split into.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from dhp.store import ConflictError, Store, WriteTx
from dhp.store.schema import metadata

documents = Table(
    "documents", metadata,
    Column("bundle_id", String(64), primary_key=True),
    Column("identifier_system", String(512), nullable=False),
    Column("identifier_value", String(512), nullable=False),
    Column("composition_key", String(1100), nullable=True),  # "system|value" of Composition.identifier
    Column("composition_id", String(64), nullable=True),  # the split Composition resource, if any
    Column("status", String(32), nullable=False),  # Composition.status as submitted
    Column("current", Boolean, nullable=False),  # False once a later version replaced it
    Column("replaces", String(64), nullable=True),  # bundle_id of the version this one replaced
    Column("docref_id", String(64), nullable=True),
    Column("patient", String(64), nullable=True),
    Column("canonical_sha256", String(64), nullable=False),  # of the canonical JSON: idempotent re-submission
    Column("source_sha256", String(64), nullable=False),
    Column("received_at", BigInteger, nullable=False),
    Column("source", LargeBinary, nullable=False),
    UniqueConstraint("identifier_system", "identifier_value", name="uq_documents_identifier"),
    Index("ix_documents_composition", "composition_key", "current"),
    # At most one current version per Composition.identifier, even when two versions race.
    Index("uq_documents_current", "composition_key", unique=True, sqlite_where=text('"current"'),
          postgresql_where=text('"current"')),
)

document_resources = Table(
    "document_resources", metadata,
    Column("bundle_id", String(64), primary_key=True),
    Column("full_url", String(1000), primary_key=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("created", Boolean, nullable=False),  # False: an existing resource was matched by identifier
    Index("ix_document_resources_target", "type", "id"),
)

_COLS = [c for c in documents.c if c.name != "source"]


@dataclass
class DocumentRow:
    bundle_id: str
    identifier_system: str
    identifier_value: str
    composition_key: str | None
    composition_id: str | None
    status: str
    current: bool
    replaces: str | None
    docref_id: str | None
    patient: str | None
    canonical_sha256: str
    source_sha256: str
    received_at: int


def _row(r: Any) -> DocumentRow | None:
    return DocumentRow(*r) if r is not None else None


async def by_identifier(tx: WriteTx, system: str, value: str) -> DocumentRow | None:
    q = select(*_COLS).where(documents.c.identifier_system == system, documents.c.identifier_value == value)
    return _row((await tx.conn.execute(q)).first())


async def current_for_composition(tx: WriteTx, key: str) -> DocumentRow | None:
    q = select(*_COLS).where(documents.c.composition_key == key, documents.c.current == literal(True))
    return _row((await tx.conn.execute(q)).first())


async def get(tx: WriteTx, bundle_id: str) -> DocumentRow | None:
    q = select(*_COLS).where(documents.c.bundle_id == bundle_id)
    if not tx.is_sqlite:
        q = q.with_for_update()
    return _row((await tx.conn.execute(q)).first())


async def add(tx: WriteTx, row: DocumentRow, source: bytes) -> None:
    try:
        await tx.conn.execute(insert(documents).values(**row.__dict__, source=source))
    except IntegrityError as e:
        # Two submissions of the same Bundle.identifier raced: the retry sees the winner (200 or 409).
        raise ConflictError(f"document {row.identifier_system}|{row.identifier_value} written concurrently") from e


async def set_docref(tx: WriteTx, bundle_id: str, docref_id: str, composition_id: str | None) -> None:
    await tx.conn.execute(update(documents).where(documents.c.bundle_id == bundle_id)
                          .values(docref_id=docref_id, composition_id=composition_id))


async def supersede(tx: WriteTx, bundle_id: str) -> bool:
    """Mark a version replaced; False when it was no longer current (a concurrent version got there first)."""
    r = await tx.conn.execute(update(documents).where(documents.c.bundle_id == bundle_id,
                                                      documents.c.current == literal(True)).values(current=False))
    return bool(r.rowcount)


async def add_resources(tx: WriteTx, bundle_id: str, rows: list[tuple[str, str, str, bool]]) -> None:
    """(fullUrl, type, id, created) for each entry split out of the document."""
    if rows:
        await tx.conn.execute(insert(document_resources), [
            {"bundle_id": bundle_id, "full_url": fu, "type": t, "id": i, "created": c} for fu, t, i, c in rows])


async def resources_of(tx: WriteTx, bundle_id: str) -> list[tuple[str, str, str, bool]]:
    q = select(document_resources.c.full_url, document_resources.c.type, document_resources.c.id,
               document_resources.c.created).where(document_resources.c.bundle_id == bundle_id)
    return [tuple(r) for r in (await tx.conn.execute(q)).all()]  # type: ignore[misc]


async def read(store: Store, bundle_id: str) -> DocumentRow | None:
    async with store.read_conn() as conn:
        r = (await conn.execute(select(*_COLS).where(documents.c.bundle_id == bundle_id))).first()
    return _row(r)


async def read_source(store: Store, bundle_id: str) -> bytes | None:
    async with store.read_conn() as conn:
        r = (await conn.execute(select(documents.c.source).where(documents.c.bundle_id == bundle_id))).first()
    return bytes(r[0]) if r is not None else None


async def split_of(store: Store, bundle_id: str) -> list[tuple[str, str, str, bool]]:
    async with store.read_conn() as conn:
        q = select(document_resources.c.full_url, document_resources.c.type, document_resources.c.id,
                   document_resources.c.created).where(document_resources.c.bundle_id == bundle_id)
        return [tuple(r) for r in (await conn.execute(q)).all()]  # type: ignore[misc]


async def by_composition_id(store: Store, composition_id: str) -> DocumentRow | None:
    async with store.read_conn() as conn:
        q = select(*_COLS).where(documents.c.composition_id == composition_id).order_by(
            documents.c.received_at.desc())
        return _row((await conn.execute(q)).first())
