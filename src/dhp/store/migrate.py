"""Schema migrations through Alembic, run on an open connection (both backends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

HERE = Path(__file__).parent / "migrations"


def config(connection: Any = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(connection: Any, target: str = "heads") -> None:
    """Sync function for ``AsyncConnection.run_sync``."""
    command.upgrade(config(connection), target)


def current_heads(connection: Any) -> tuple[set[str], set[str]]:
    """(applied revisions, newest revisions) — equal when the schema is up to date."""
    ctx = MigrationContext.configure(connection)
    script = ScriptDirectory.from_config(config())
    return set(ctx.get_current_heads()), set(script.get_heads())
