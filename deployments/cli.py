"""``fabflows deploy`` on the CLI (see deployments/apply.py)."""

from __future__ import annotations

import argparse

from deployments.apply import add_arguments, run


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy", help="register block types, work pool, deployments, schedules, automation"
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)
