"""``fabflows chatops serve`` on the CLI (see fabflows/chatops/app.py)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from fabflows.chatops.app import add_arguments, run

    parser = subparsers.add_parser("chatops", help="the Slack chatops service")
    add_arguments(parser)
    parser.set_defaults(handler=run)
