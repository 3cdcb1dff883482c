"""The click pieces every console entry point is built from: grouped ``--help``, registry choices, one-line errors.

click has no option groups; :class:`GroupedCommand` prints the options under the headings their
:class:`Opt` names, then the command's examples. :class:`RegistryChoice` is a ``click.Choice``
whose choices are read from a registry the first time they are needed (a value to check, a help
page, a shell completion), so ``--version`` and option-name completion never import torch.
:func:`run` runs a command the way the CLI promises: a usage error is one line on stderr and exit
code 2, ``--help``/``--version`` return 0, shell completion is click's own.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Any, Callable, Iterable, Sequence

import click

from .cli_common import EXIT_USAGE, one_line

GENERAL = "General"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def version() -> str:
    """The installed distribution's version (``recipe-compiler --version``)."""
    try:
        return metadata.version("recipe-compiler")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class Opt(click.Option):
    """A ``click.Option`` that names the ``--help`` section it is listed under (``group=``)."""

    def __init__(self, *args: Any, group: str = GENERAL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def get_help_record(self, ctx: click.Context):
        record = super().get_help_record(ctx)
        if record is None or not isinstance(self.type, RegistryChoice):
            return record
        return record[0], f"{record[1]} [choices: {', '.join(self.type.choices)}]".strip()


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists options by group (in ``groups`` order), then ``examples``."""

    def __init__(self, *args: Any, groups: Sequence[str] = (), examples: Sequence[tuple[str, str]] = (), **kwargs: Any) -> None:
        kwargs.setdefault("context_settings", CONTEXT)
        super().__init__(*args, **kwargs)
        self.groups = list(groups)
        self.examples = list(examples)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list] = {}
        arguments = [p for p in self.get_params(ctx) if isinstance(p, click.Argument)]
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group", GENERAL), []).append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl([(a.make_metavar(ctx) if _takes_ctx(a) else a.make_metavar(), getattr(a, "help_text", "")) for a in arguments])
        for title in [*self.groups, *[t for t in sections if t not in self.groups]]:
            if sections.get(title):
                with formatter.section(title):
                    formatter.write_dl(sections[title])

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if self.examples:
            with formatter.section("Examples"):
                for comment, command in self.examples:
                    formatter.write(f"{'':>{formatter.current_indent}}# {comment}\n{'':>{formatter.current_indent}}{command}\n")
        super().format_epilog(ctx, formatter)


def _takes_ctx(argument: click.Argument) -> bool:
    import inspect

    return "ctx" in inspect.signature(argument.make_metavar).parameters


class Arg(click.Argument):
    """A positional argument with a help line (click's arguments have none)."""

    def __init__(self, *args: Any, help: str = "", **kwargs: Any) -> None:  # noqa: A002 - click's own name
        super().__init__(*args, **kwargs)
        self.help_text = help


class RegistryChoice(click.Choice):
    """``click.Choice`` over a registry's names, read from ``load()`` when first needed."""

    def __init__(self, load: Callable[[], Iterable[str]], *, metavar: str = "NAME", normalize: Callable[[str], str] | None = None) -> None:
        self._load = load
        self._choices: tuple[str, ...] | None = None
        self._metavar = metavar
        self._normalize = normalize
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        if self._choices is None:
            # numpy before any registry pulls in torch: torch's C module imports numpy itself and swallows
            # any exception from that import, a Ctrl-C included, which would then be lost.
            import numpy  # noqa: F401

            self._choices = tuple(self._load())
        return self._choices

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # noqa: ARG002
        return self._metavar

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and self._normalize is not None:
            value = self._normalize(value)
        return super().convert(value, param, ctx)


class Budget(click.FloatRange):
    """A FLOPs budget: a ``click.FloatRange`` over (0, 1] whose errors say what the number means."""

    name = "budget"

    def __init__(self) -> None:
        super().__init__(0.0, 1.0, min_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"budget must be a number in (0, 1], got {value!r}", param, ctx)
        if not 0 < number <= 1:  # also refuses nan
            self.fail(f"budget must be in (0, 1] (the fraction of unpruned prefill FLOPs to spend), got {value}", param, ctx)
        return number


class Parsed(click.ParamType):
    """A ``click.ParamType`` from a parse function that raises ``ValueError`` with a one-line message."""

    def __init__(self, parse: Callable[[str], Any], name: str, complete: Callable[[str], list[str]] | None = None) -> None:
        self._parse, self.name, self._complete = parse, name, complete

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(one_line(exc), param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str):
        from click.shell_completion import CompletionItem

        return [CompletionItem(c) for c in (self._complete(incomplete) if self._complete else [])]


def comma_completer(load: Callable[[], Iterable[str]]) -> Callable[[str], list[str]]:
    """Complete the last entry of a comma-separated list (``--compare fastv,vis<TAB>``) from ``load()``."""
    def complete(incomplete: str) -> list[str]:
        head, _, last = incomplete.rpartition(",")
        prefix = head + "," if head else ""
        return [prefix + name for name in load() if name.startswith(last)]
    return complete


def run(command: click.Command, argv: Sequence[str] | None, prog: str | None) -> int:
    """Run ``command`` on ``argv`` (``sys.argv[1:]`` when None): its exit code, or ``SystemExit(2)`` on a usage error.

    A usage error (unknown option, bad value, missing option) is one line,
    ``PROG: error: MESSAGE (see PROG --help)``, and exit code 2, as before the CLI used click.
    """
    complete_var = "_" + (prog or "").replace("-", "_").upper() + "_COMPLETE"
    if argv is None and prog and os.environ.get(complete_var):
        command.main(prog_name=prog, complete_var=complete_var)  # click prints the script or the completions and exits
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with command.make_context(prog, args) as ctx:
            return int(command.invoke(ctx) or 0)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else (prog or command.name)
        print(f"{where}: error: {one_line(_message(exc))} (see {where} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except click.ClickException as exc:
        print(f"{prog or command.name}: error: {one_line(exc.format_message())}", file=sys.stderr)
        return exc.exit_code


def _message(exc: click.UsageError) -> str:
    message = exc.format_message()
    return message.rstrip(".") if message.endswith(".") and not message.endswith("..") else message


# Option types shared by recipe-compile and recipe-eval (here, not in cli.py: evaluate imports them).
def _dtype_names() -> tuple[str, ...]:
    from .models import _DTYPE_NAMES

    return tuple(_DTYPE_NAMES)


def _dtype_key(text: str) -> str:
    key = text.strip().lower()
    return key[len("torch."):] if key.startswith("torch.") else key


def _model_aliases() -> list[str]:
    from .families import ALIASES

    return sorted(ALIASES)


def _model_type():
    """``--model``: any alias, hub id or directory (checked when the model is prepared); completes the aliases."""
    return Parsed(str, "model", lambda incomplete: [a for a in _model_aliases() if a.startswith(incomplete.lower())])


def _attn():
    from .cli_common import attn_implementations

    return attn_implementations()
