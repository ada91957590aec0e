"""`biomedgpt audit show`: read the audit trail (`biomedgpt.audit`): serving requests and admission decisions."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_audit_show(args: argparse.Namespace) -> int:
    from ..audit import KINDS, AuditReadReport, audit_root, format_table, parse_time, read_audit

    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    if since and until and until < since:
        raise ValueError(f"--until {args.until} is before --since {args.since}")
    root = args.root or audit_root(args.registry)
    kinds = KINDS if args.kind == "all" else (args.kind,)
    report = AuditReadReport()
    total = 0
    for kind in kinds:
        records = list(read_audit(root, kind, since=since, until=until, department=args.department, report=report))
        if args.limit:
            records = records[-args.limit:]
        total += len(records)
        if args.json:
            for rec in records:
                print(json.dumps(rec, sort_keys=True))
            continue
        who = f" of {args.department}" if args.department else ""
        print(f"{kind}{who}: {len(records)} line(s) in {root}" + (f" since {since.isoformat()}" if since else ""))
        if records:
            print(format_table(records, kind))
    for rel, n in sorted(report.bad_lines.items()):
        print(f"warning: {root}: {rel}: {n} line(s) that are not audit records were skipped", file=sys.stderr)
    if not report.files and not args.json:
        print(f"(no audit files in {root} for that period)", file=sys.stderr)
    return 0


def add_audit_commands(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="the audit trail: serving requests and admission decisions",
                           description="Read the append-only audit trail under the registry's storage "
                                       "(<registry>/_audit, or $BIOMEDGPT_AUDIT): one JSON line per /v1 request "
                                       "(time, department, key id, model id@version, sha256 of the input, status, "
                                       "latency) and per admission decision of run, submit and k8s rayjob.")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    audit_sub.required = True
    show = audit_sub.add_parser("show", help="print the trail's lines, oldest first",
                                description="Print audit lines, oldest first, as a table (or JSON lines).")
    show.add_argument("--department", help="only this department's requests (admission lines: this team's jobs)")
    show.add_argument("--since", help="from this time: 2026-12-05, 2026-12-05T14:00Z, or a duration ago: 30m, 2h, 7d")
    show.add_argument("--until", help="up to this time (same forms as --since)")
    show.add_argument("--kind", choices=["requests", "admission", "all"], default="requests",
                      help="which lines (default: requests)")
    show.add_argument("--registry", help="the registry whose trail to read (default: $BIOMEDGPT_REGISTRY or ./registry)")
    show.add_argument("--root", help="the trail's location itself (overrides --registry and $BIOMEDGPT_AUDIT)")
    show.add_argument("--limit", type=int, default=0, help="only the last N lines of each kind")
    show.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    show.set_defaults(func=_cmd_audit_show)
