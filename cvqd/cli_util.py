"""Shared command-line plumbing: one-line errors with exit status 2, never a traceback for user mistakes."""

from __future__ import annotations

import sys

import click

from cvqd.errors import CvqdError


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def run_command(cmd: click.Command, prog: str, args: list[str] | None = None) -> None:
    """Run a click command; user errors print `prog: error: message` on one line and exit 2."""
    try:
        rv = cmd.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except CvqdError as exc:
        click.echo(f"{prog}: error: {one_line(str(exc))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
