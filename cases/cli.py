"""`python -m cases {list,show,export,import,backup,precompute,add-instructor,validate} [--db URL]`.

Errors print one line on stderr and exit with status 2. `--db` takes any SQLAlchemy URL or a file path;
without it, DATABASE_URL or `var/medplib_cases.sqlite` is used. Only `precompute` imports the engine.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from cases.archive import export_archive, import_archive
from cases.casefolder import case_folders, validate_folder
from cases.errors import CaseStoreError
from cases.records import CaseRecord, CaseSummary
from cases.store import CaseStore

log = logging.getLogger("cases")

EXIT_ERROR = 2
PASSWORD_ENV = "MEDPLIB_INSTRUCTOR_PASSWORD"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cases", description="MedPLIB teaching-case library")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL or SQLite file (default: DATABASE_URL or "
                        "var/medplib_cases.sqlite)")  # fmt: skip
    parser.add_argument("--no-starter", action="store_true", help="do not seed a new database")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="list cases (published and unpublished)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = sub.add_parser("show", help="show one case")
    show.add_argument("case", help="case id or slug")
    export = sub.add_parser("export", help="write cases to a zip archive")
    export.add_argument("--out", required=True, type=Path)
    export.add_argument("--nifti-masks", action="store_true", help="also carry masks as NIfTI (.nii.gz)")
    export.add_argument(
        "--case", action="append", default=[], help="case id or slug (repeatable; default all)"
    )
    importing = sub.add_parser("import", help="add the cases of a zip archive (all or nothing)")
    importing.add_argument("archive", type=Path)
    backup = sub.add_parser("backup", help="online backup of a SQLite library")
    backup.add_argument("--out", required=True, type=Path)
    pre = sub.add_parser("precompute", help="cache model answers for every case question")
    pre.add_argument("--model", default=None, help="model folder or hub id (default: the shipped model)")
    pre.add_argument("--device", default=None)
    pre.add_argument("--max-new-tokens", type=int, default=128)
    pre.add_argument("--case", action="append", default=[], help="case id or slug (repeatable; default all)")
    pre.add_argument("--force", action="store_true", help="recompute questions that already have an output")
    add = sub.add_parser("add-instructor", help=f"create an instructor account (password from ${PASSWORD_ENV} "
                         "or a prompt)")  # fmt: skip
    add.add_argument("username")
    check = sub.add_parser("validate", help="check case folders (cases/library or an unzipped export)")
    check.add_argument("folder", type=Path, help="a library folder of case folders, or one case folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command == "validate":  # files only: no database
        return _validate(args.folder)
    try:
        store = CaseStore(args.db or os.environ.get("DATABASE_URL"), seed_starter=not args.no_starter)
        try:
            COMMANDS[args.command](store, args)
        finally:
            store.close()
    except (CaseStoreError, OSError, ValueError, SQLAlchemyError, ImportError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR
    return 0


def summary_json(summary: CaseSummary) -> dict[str, Any]:
    """The `list --json` row of one case."""
    return {
        "id": summary.id, "slug": summary.slug, "title": summary.title, "modality": summary.modality,
        "anatomy": summary.anatomy, "difficulty": summary.difficulty, "n_images": summary.n_images,
        "n_masks": summary.n_masks, "n_questions": summary.n_questions, "published": summary.published,
    }  # fmt: skip


def _list(store: CaseStore, args: argparse.Namespace) -> None:
    cases = store.list_cases(include_unpublished=True)
    if args.json:
        print(json.dumps([summary_json(c) for c in cases], indent=1, ensure_ascii=False))
        return
    for c in cases:
        flag = "" if c.published else "  [unpublished]"
        print(f"{c.id:4d}  {c.modality:<24} {c.anatomy:<14} {c.title}{flag}")
    print(f"{len(cases)} case{'' if len(cases) == 1 else 's'}")


def _show(store: CaseStore, args: argparse.Namespace) -> None:
    print(format_case(store.get_case(args.case, store.operator_session())))


def format_case(case: CaseRecord) -> str:
    """Plain-text rendering of a case for the terminal."""
    s = case.summary
    lines = [
        f"#{s.id} {s.title}  ({s.slug}){'' if s.published else '  [unpublished]'}",
        f"{s.modality} | {s.anatomy} | {s.plane} | {s.difficulty} | tags: {', '.join(s.tags)}",
        "", f"Vignette: {case.vignette}", f"Findings: {case.findings}", f"Discussion: {case.discussion}",
        "Key points:", *[f"  - {p}" for p in case.key_points],
        "Images:", *[f"  {i.position}: {i.width}x{i.height} spacing={i.spacing_mm} masks="
                     f"{[m.label for m in i.masks]}" for i in case.images],
        "Questions:", *[f"  [{q.id}] {q.kind}: {q.prompt} -> {q.reference_answer}" for q in case.questions],
        f"Source: {case.source}", f"Licence: {case.licence}", f"Provenance: {case.provenance}",
    ]  # fmt: skip
    return "\n".join(lines)


def _export(store: CaseStore, args: argparse.Namespace) -> None:
    n = export_archive(store, store.operator_session(), args.out, args.case, nifti_masks=args.nifti_masks)
    print(f"exported {n} cases to {args.out}")


def _import(store: CaseStore, args: argparse.Namespace) -> None:
    slugs = import_archive(store, store.operator_session(), args.archive)
    print(f"imported {len(slugs)} cases from {args.archive}")


def _validate(folder: Path) -> int:
    """Print one line per problem (or per valid case) and return 0 only when every case folder is valid."""
    problems = validate_folder(folder)
    for name, problem in problems:
        print(f"{name}: {problem}", file=sys.stderr)
    n = len(case_folders(folder))
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {n} case folders", file=sys.stderr)
        return EXIT_ERROR
    print(f"{n} case folder{'s' if n != 1 else ''} valid")
    return 0


def _backup(store: CaseStore, args: argparse.Namespace) -> None:
    print(f"backup written to {store.backup(args.out)}")


def _add_instructor(store: CaseStore, args: argparse.Namespace) -> None:
    password = os.environ.get(PASSWORD_ENV) or getpass.getpass(f"password for {args.username}: ")
    store.create_instructor(store.operator_session(), args.username, password)
    print(f"instructor {args.username!r} created")


def _precompute(store: CaseStore, args: argparse.Namespace) -> None:
    from cases.precompute import precompute_outputs  # imports the engine (torch) lazily

    n = precompute_outputs(
        store, model=args.model, device=args.device, max_new_tokens=args.max_new_tokens,
        cases=args.case, force=args.force,
    )  # fmt: skip
    print(f"stored {n} model outputs")


COMMANDS = {
    "list": _list, "show": _show, "export": _export, "import": _import, "backup": _backup,
    "precompute": _precompute, "add-instructor": _add_instructor,
}  # fmt: skip

__all__ = ["build_parser", "format_case", "main", "summary_json"]
