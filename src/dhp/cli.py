"""The ``dhp`` command: serve, database, packages (and the commands other modules add)."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dhp.settings import Settings

app = typer.Typer(help="DHP — Uzbekistan's Digital Health Platform FHIR R5 server.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema and data.", no_args_is_help=True)
packages_app = typer.Typer(help="FHIR packages (IGs).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(packages_app, name="packages")
console = Console(stderr=True)


def _mount_optional() -> None:
    """Commands from service packages that are present in this build."""
    for module, attr, name in (("dhp.auth.cli", "clients_app", "clients"), ("dhp.auth.cli", "users_app", "users")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue
        sub = getattr(mod, attr, None)
        if sub is not None:
            app.add_typer(sub, name=name)
    try:
        vmod = importlib.import_module("dhp.validation.cli")
    except ModuleNotFoundError:
        vmod = None
    if vmod is not None and hasattr(vmod, "validate"):
        app.command("validate")(vmod.validate)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=console, transient=False)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    workers: Annotated[int, typer.Option(help="Worker processes (stateless; share the database).")] = 1,
) -> None:
    """Start the FHIR server (embedded SQLite by default, DHP IG packages loaded)."""
    import uvicorn

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    # Prepare once in this process (packages, migrations, first-run install) with a progress bar, so the
    # workers start warm.
    registry = asyncio.run(_prepare(settings))
    console.print(f"[green]ready in {time.perf_counter() - started:.1f}s[/] — FHIR base "
                  f"{settings.base_url or f'http://{host}:{port}/fhir'}")
    if workers > 1:
        uvicorn.run("dhp.api.app:create_process_app", factory=True, host=host, port=port, workers=workers,
                    log_level=settings.log_level, proxy_headers=True)
    else:
        from dhp.api import create_app

        uvicorn.run(create_app(settings, registry, own_process=True), host=host, port=port,
                    log_level=settings.log_level, proxy_headers=True)


async def _prepare(settings: Settings) -> Any:
    from dhp.api.app import build_server
    from dhp.conformance import load_registry
    from dhp.interactions.packages import install_packages

    with console.status("loading FHIR packages"):
        registry = load_registry(settings)
    console.print("packages: " + ", ".join(str(p.ref) for p in registry.packages))
    server = await build_server(settings, registry, install=False)
    try:
        with _progress() as prog:
            tasks: dict[str, Any] = {}

            def report(ref: str, done: int, total: int) -> None:
                if ref not in tasks:
                    tasks[ref] = prog.add_task(f"installing {ref}", total=total)
                prog.update(tasks[ref], completed=done)

            await install_packages(server, report)
        if settings.auth == "on":
            try:
                auth = importlib.import_module("dhp.auth")
            except ModuleNotFoundError:
                auth = None
            if auth is not None:
                await auth.start(server)
                creds = await auth.ensure_admin_client(server)
                if creds:
                    console.print("[bold yellow]Admin client created (shown once):[/]")
                    print(f"  client_id:     {creds['client_id']}\n  client_secret: {creds['client_secret']}",
                          flush=True)
        else:
            console.print("[bold red]WARNING: DHP_AUTH=off — the FHIR API accepts requests without a token.[/]")
    finally:
        await server.store.close()
    return registry


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply database migrations (every branch) to DHP_DATABASE_URL."""
    from dhp.store import Store

    async def run() -> None:
        store = Store(Settings.from_env().database_url)
        await store.open(migrate=True)
        await store.close()

    asyncio.run(run())
    console.print("[green]database is up to date[/]")


@packages_app.command("install")
def packages_install(ref: Annotated[str, typer.Argument(help="ID#VERSION, or a .tgz file / package folder")]) -> None:
    """Install a package (and its dependencies) into the FHIR package cache."""
    from dhp.conformance import PackageError, PackageRef, package_manager

    settings = Settings.from_env()
    pm = package_manager(settings)
    try:
        with console.status(f"installing {ref}"):
            path = Path(ref)
            installed = pm.install_path(path) if path.exists() else pm.ensure(PackageRef.parse(ref))
            pkgs = pm.resolve([installed])
    except (PackageError, OSError) as e:
        # Escaped: a message quoting a file name or version such as "[/x]" must not be read as markup.
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    for p in pkgs:
        print(f"{p.ref}\t{len(p.entries)} resources\t{p.root}")


@packages_app.command("list")
def packages_list() -> None:
    """Packages in the cache, and which of them the server loads."""
    from dhp.conformance import PackageError, PackageRef, package_manager

    settings = Settings.from_env()
    pm = package_manager(settings)
    try:
        wanted = {PackageRef.parse(p) for p in settings.package_list}
    except PackageError as e:
        console.print(f"[red]error:[/] DHP_PACKAGES: {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None
    table = Table("package", "version", "loaded at start-up", "path")
    for ref in pm.cached():
        table.add_row(ref.id, ref.version, "yes" if ref in wanted else "", str(pm.path_of(ref)))
    for ref in sorted(set(pm.local()) - set(pm.cached())):
        table.add_row(ref.id, ref.version, "yes" if ref in wanted else "", str(pm.local()[ref]) + " (local)")
    Console().print(table)


_mount_optional()


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
