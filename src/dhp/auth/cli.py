"""``dhp clients …`` and ``dhp users …``: manage SSO clients and users in the configured database.

Scripts depend on these exact forms::

    dhp clients create --name NAME --scopes "SCOPES" [--public] [--redirect-uri URI]... --json
    dhp users create --username U --password P [--fhir-user Practitioner/ID] --json
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dhp.settings import Settings

clients_app = typer.Typer(help="OAuth clients of the SSO.", no_args_is_help=True)
users_app = typer.Typer(help="Users who sign in (practitioners, patients, administrators).", no_args_is_help=True)

T = TypeVar("T")
console = Console()
err = Console(stderr=True)


def _run(fn: Callable[[Any], Awaitable[T]]) -> T:
    from dhp.store import Store

    async def main() -> T:
        settings = Settings.from_env()
        store = Store(settings.database_url)
        await store.open(migrate=settings.auto_migrate)
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False))


def _lifetime_us() -> int:
    from dhp.store import now_us

    return now_us() + (Settings.from_env().token_lifetime + 60) * 1_000_000


@clients_app.command("create")
def clients_create(
    name: str = typer.Option(..., "--name", help="Human-readable client name."),
    scopes: str = typer.Option(..., "--scopes", help='Allowed scopes, space-separated, e.g. "system/*.rs".'),
    public: bool = typer.Option(False, "--public", help="A public client (no secret; PKCE required)."),
    redirect_uri: list[str] = typer.Option([], "--redirect-uri", help="Registered redirect URI (repeatable)."),
    grant_type: list[str] = typer.Option([], "--grant-type", help="Allowed grant type (repeatable)."),
    organization: str | None = typer.Option(None, "--organization", help="Owning Organization/ID."),
    as_json: bool = typer.Option(False, "--json", help="Print {client_id, client_secret} as JSON."),
) -> None:
    from dhp.auth.core import create_client

    out = _run(lambda s: create_client(s, name=name, scopes=scopes, public=public, redirect_uris=redirect_uri,
                                       grant_types=grant_type or None, organization=organization))
    if as_json:
        _print_json(out)
    else:
        console.print(f"client_id: [bold]{out['client_id']}[/bold]")
        if "client_secret" in out:
            console.print(f"client_secret: [bold]{out['client_secret']}[/bold]  (shown once; store it now)")


@clients_app.command("list")
def clients_list(as_json: bool = typer.Option(False, "--json")) -> None:
    from dhp.store import auth as db

    rows = [c.public_view() for c in _run(db.list_clients)]
    if as_json:
        _print_json(rows)
        return
    t = Table("client_id", "name", "type", "grants", "scopes", "status")
    for c in rows:
        t.add_row(c["client_id"], c["name"], "public" if c["public"] else "confidential",
                  " ".join(c["grant_types"]), c["scope"], "revoked" if c["revoked"] else "active")
    console.print(t)


@clients_app.command("revoke")
def clients_revoke(client_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    from dhp.store import auth as db

    ok = _run(lambda s: db.revoke_client(s, client_id, _lifetime_us()))
    if as_json:
        _print_json({"client_id": client_id, "revoked": ok})
    elif ok:
        console.print(f"client {client_id} revoked; its tokens stop working within a second")
    if not ok:
        err.print(f"no active client {client_id}")
        raise typer.Exit(1)


@clients_app.command("rotate-secret")
def clients_rotate_secret(client_id: str = typer.Argument(...),
                          as_json: bool = typer.Option(False, "--json")) -> None:
    from dhp.auth.core import rotate_client_secret

    secret = _run(lambda s: rotate_client_secret(s, client_id))
    if secret is None:
        err.print(f"no active confidential client {client_id}")
        raise typer.Exit(1)
    if as_json:
        _print_json({"client_id": client_id, "client_secret": secret})
    else:
        console.print(f"client_secret: [bold]{secret}[/bold]  (shown once; the old secret no longer works)")


@users_app.command("create")
def users_create(
    username: str = typer.Option(..., "--username"),
    password: str = typer.Option(..., "--password"),
    fhir_user: str | None = typer.Option(None, "--fhir-user", help="Practitioner/ID or Patient/ID."),
    role: str | None = typer.Option(None, "--role", help="practitioner | patient | admin (default from fhirUser)."),
    name: str | None = typer.Option(None, "--name", help="Display name."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    from dhp.auth.core import create_user

    out = _run(lambda s: create_user(s, username=username, password=password, fhir_user=fhir_user, role=role,
                                     name=name))
    if as_json:
        _print_json(out)
    else:
        console.print(f"user [bold]{out['username']}[/bold] created ({out['role']})")


@users_app.command("list")
def users_list(as_json: bool = typer.Option(False, "--json")) -> None:
    from dhp.store import auth as db

    rows = [u.public_view() for u in _run(db.list_users)]
    if as_json:
        _print_json(rows)
        return
    t = Table("username", "role", "fhirUser", "name", "status")
    for u in rows:
        t.add_row(u["username"], u["role"], u["fhir_user"] or "", u["name"] or "",
                  "disabled" if u["disabled"] else "active")
    console.print(t)


@users_app.command("disable")
def users_disable(username: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    from dhp.store import auth as db

    ok = _run(lambda s: db.disable_user(s, username, _lifetime_us()))
    if as_json:
        _print_json({"username": username, "disabled": ok})
    elif ok:
        console.print(f"user {username} disabled; their tokens stop working within a second")
    if not ok:
        err.print(f"no user {username}")
        raise typer.Exit(1)


@users_app.command("set-password")
def users_set_password(username: str = typer.Argument(...),
                       password: str = typer.Option(..., "--password", prompt=True, hide_input=True,
                                                    confirmation_prompt=True),
                       as_json: bool = typer.Option(False, "--json")) -> None:
    from dhp.auth.core import hash_password
    from dhp.store import auth as db

    if len(password) < 8:
        err.print("a password needs at least 8 characters")
        raise typer.Exit(2)
    ok = _run(lambda s: db.set_user_password(s, username, hash_password(password)))
    if as_json:
        _print_json({"username": username, "password_set": ok})
    elif ok:
        console.print(f"password of {username} changed")
    if not ok:
        err.print(f"no user {username}")
        raise typer.Exit(1)
