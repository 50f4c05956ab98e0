"""Shared command-line plumbing: one-line errors with exit status 2, never a traceback for user mistakes."""

from __future__ import annotations

import re
import sys

import click

from cvqd.errors import CvqdError


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def as_flags(msg: str, flags: dict[str, str]) -> str:
    """The library names Python parameters ("batch_size 12 is above ..."); a command shows its flags instead.
    Only whole words that are known parameters at the start of the message or after "use " are replaced."""
    for name, flag in flags.items():
        msg = re.sub(rf"(^|\buse (?:a smaller |a larger )?)({re.escape(name)})\b(?!-)", rf"\g<1>{flag}", msg)
    return msg


def add_version(cmd: click.Command, prog: str) -> None:
    """`--version` on every command: the package version and the Python it runs on."""
    if any("--version" in getattr(p, "opts", ()) for p in cmd.params):
        return
    import cvqd

    def show(ctx: click.Context, _param, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(f"{prog} (cvqd) {cvqd.__version__}, Python {sys.version.split()[0]}")
            ctx.exit()

    cmd.params.append(click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True, callback=show,
                                   help="Show the version and exit."))


def run_command(cmd: click.Command, prog: str, args: list[str] | None = None,
                flags: dict[str, str] | None = None) -> None:
    """Run a click command; user errors print `prog: error: message` on one line and exit 2 (130 for Ctrl-C)."""
    add_version(cmd, prog)
    try:
        rv = cmd.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {one_line(exc.format_message())}", err=True)
        sys.exit(2)
    except CvqdError as exc:
        msg = one_line(str(exc))
        click.echo(f"{prog}: error: {as_flags(msg, flags) if flags else msg}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
