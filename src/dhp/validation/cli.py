"""``dhp validate PATH... [--profile URL] [--package ID#VERSION|FILE] [--format text|json]``.

Works offline on files and folders (every ``*.json`` below a folder); packages come from the FHIR cache
and local files. Output is grouped by file; the exit status is 1 when any file has an error.
Runnable on its own: ``python -m dhp.validation.cli PATH...``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dhp import fhirjson
from dhp.errors import Issue, outcome

_STYLE = {"fatal": "bold red", "error": "red", "warning": "yellow", "information": "cyan"}


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*.json") if q.is_file() and not q.name.startswith(".")
                              and q.name not in ("package.json", ".index.json")))
        else:
            out.append(p)
    return out


def _registry(packages: list[str]) -> Any:
    from dhp.conformance import Registry, load_registry, package_manager
    from dhp.conformance.packages import PackageRef
    from dhp.settings import Settings

    settings = Settings.from_env()
    registry: Registry = load_registry(settings)
    if packages:
        pm = package_manager(settings)
        have = {(p.id, p.version) for p in registry.packages}
        for spec in packages:
            path = Path(spec).expanduser()
            ref = pm.install_path(path) if path.exists() else pm.ensure(PackageRef.parse(spec))
            if (ref.id, ref.version) not in have:
                registry.add_package(pm.open(ref))
                have.add((ref.id, ref.version))
    return registry, settings


def _line(issue: Issue) -> str:
    line = col = None
    for e in issue.extensions:
        if e.get("url", "").endswith("issue-line"):
            line = e.get("valueInteger")
        elif e.get("url", "").endswith("issue-col"):
            col = e.get("valueInteger")
    return f"{line}:{col}" if line else ""


def validate(
    paths: Annotated[list[Path], typer.Argument(help="JSON files or folders of FHIR resources.")],
    profile: Annotated[list[str] | None, typer.Option("--profile", "-p",
                                                      help="Profile URL to validate against (repeatable); "
                                                           "default: meta.profile + the DHP defaults.")] = None,
    package: Annotated[list[str] | None, typer.Option("--package",
                                                      help="Extra package: id#version or a .tgz/folder "
                                                           "(repeatable).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="text or json.")] = "text",
) -> None:
    """Validate FHIR resources against the base R5 specification, UZ Core and the DHP profiles."""
    if format not in ("text", "json"):
        raise typer.BadParameter("format must be text or json", param_hint="--format")
    err = Console(stderr=True)
    out = Console()
    files = _files(paths)
    missing = [p for p in paths if not p.exists()]
    if missing:
        err.print(f"[red]not found:[/red] {', '.join(str(m) for m in missing)}")
        raise typer.Exit(2)
    if not files:
        err.print("[yellow]no JSON files found[/yellow]")
        raise typer.Exit(2)
    from dhp.terminology import Terminology
    from dhp.validation import Validator

    try:
        registry, settings = _registry(list(package or []))
    except Exception as e:
        err.print(f"[red]cannot load packages:[/red] {e}")
        raise typer.Exit(2) from None
    validator = Validator(registry, Terminology(registry), require_meta_profile=settings.require_meta_profile)
    results: list[tuple[Path, list[Issue]]] = []
    for f in files:
        try:
            data = f.read_bytes()
            res = fhirjson.loads(data)
            issues = validator.validate(res, list(profile) if profile else None, source=data)
        except (OSError, fhirjson.JSONError) as e:
            issues = [Issue("fatal", "structure", f"cannot read {f.name}: {e}", message_id="json-invalid")]
        results.append((f, issues))
    failed = sum(1 for _, iss in results if any(i.severity in ("error", "fatal") for i in iss))
    if format == "json":
        doc = {"files": [{"path": str(f), "outcome": outcome(iss)} for f, iss in results],
               "summary": {"files": len(results), "failed": failed}}
        sys.stdout.write(fhirjson.dumps(doc, pretty=True).decode() + "\n")
    else:
        for f, iss in results:
            n_err = sum(1 for i in iss if i.severity in ("error", "fatal"))
            n_warn = sum(1 for i in iss if i.severity == "warning")
            head = Text(str(f), style="bold")
            head.append(f"  {n_err} error(s), {n_warn} warning(s)",
                        style="red" if n_err else ("yellow" if n_warn else "green"))
            out.print(head)
            shown = [i for i in iss if i.severity != "information"] or []
            if shown:
                t = Table(show_header=True, header_style="dim", box=None, pad_edge=False)
                t.add_column("severity")
                t.add_column("line:col")
                t.add_column("where")
                t.add_column("message")
                t.add_column("id", style="dim")
                for i in shown:
                    t.add_row(Text(i.severity, style=_STYLE.get(i.severity, "")), _line(i),
                              ", ".join(i.expression), i.diagnostics, i.message_id or "")
                out.print(t)
        out.print(Text(f"{len(results)} file(s), {failed} with errors",
                       style="bold red" if failed else "bold green"))
    if failed:
        raise typer.Exit(1)


def main() -> None:
    typer.run(validate)


if __name__ == "__main__":
    main()
