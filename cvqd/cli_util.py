"""Shared command-line plumbing: one-line errors with exit status 2, never a traceback for user mistakes."""

from __future__ import annotations

import re
import sys

import click

from cvqd.errors import CvqdError


# Modules of the optional extras -> (extra, what it is for): a command that needs one names the install to run
EXTRAS = {name: ("train", "PyTorch and the ONNX export tools") for name in
          ("torchvision", "open_clip", "onnx", "onnxscript", "onnxslim")}
EXTRAS["torch"] = ("train]' (training, export, the torch backend) or 'cvqd[gpu]' (NVIDIA GPUs", "PyTorch")
EXTRAS["cuda"] = ("gpu", "cuda-python (the fused CUDA kernels)")


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def as_flags(msg: str, flags: dict[str, str]) -> str:
    """The library names Python parameters ("batch_size 12 is above ...", "pass ckpt=..."); a command shows its
    flags instead. Only known parameter names at the start of the message or after "use"/"pass" are replaced."""
    for name, flag in flags.items():
        end = r"\b(?!-)" if (name[-1].isalnum() or name[-1] == "_") else ""
        lead = "use|pass|or" if "=" in name else "use|pass"  # "or device='cpu'" names a parameter, "or steps" need not
        msg = re.sub(rf"(^|\b(?:{lead}) (?:a smaller |a larger )?){re.escape(name)}{end}",
                     lambda m: m.group(1) + flag, msg)
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
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        click.echo(f"{prog}: error: this needs {extra[1]}, which the runtime-only install leaves out (no module "
                   f"named {exc.name!r}); pip install 'cvqd[{extra[0]}]'", err=True)
        sys.exit(2)
    sys.exit(rv if isinstance(rv, int) else 0)
