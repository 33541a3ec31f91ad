"""Tables of the resource store. Migrations in ``store/migrations`` create them; keep both in step."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

#: The current version of every resource (deleted ones too, flagged), as the exact JSON bytes served.
resources = Table(
    "resources", metadata,
    Column("type", String(64), primary_key=True),
    Column("id", String(64), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),  # microseconds since the epoch, UTC
    Column("deleted", Boolean, nullable=False, default=False),
    # Patient compartment key: lets a later sharding by patient keep a patient's rows together. Not indexed:
    # no query reads it (compartment search reads the search index rows).
    Column("patient", String(64), nullable=True),
    # "id#version" of the package a resource was installed from; NULL for data written through the API.
    Column("package", String(200), nullable=True),
    Column("content", LargeBinary, nullable=False),
    # Which extraction wrote the resource's search index rows (``dhp.search.engine.SearchEngine.index_key``):
    # an update whose extraction is the same rewrites only the rows that changed. NULL: not known.
    Column("index_key", BigInteger, nullable=True),
    Index("ix_resources_type_updated", "type", "last_updated"),
)

#: Every version of every resource, in write order (seq).
history = Table(
    "history", metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", BigInteger, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("method", String(8), nullable=False),  # POST, PUT, PATCH, DELETE
    Column("content", LargeBinary, nullable=False),
    # Also the index of instance history (newest version first).
    UniqueConstraint("type", "id", "version", name="uq_history_version"),
    Index("ix_history_updated", "last_updated"),
    Index("ix_history_type_seq", "type", "seq"),
)

#: Small named counters; ``conformance_epoch`` tells every process that conformance resources changed.
counters = Table(
    "counters", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

#: Packages whose resources were installed into this database.
installed_packages = Table(
    "installed_packages", metadata,
    Column("ref", String(200), primary_key=True),
    Column("installed_at", BigInteger, nullable=False),
    Column("resources", Integer, nullable=False),
)
