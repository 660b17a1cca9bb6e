"""The one way jobs start and end: parse config, run, print a JSON summary, map errors to exit codes.

Exit 0 on success, 2 on usage or config errors (one line on stderr, no traceback), 1 on runtime failure. Storage,
network and hub failures are one line too (:mod:`pipeline.failures`); ``--debug`` adds the traceback.

``atr NAME ...`` (the console script, :func:`main`) runs ``jobs/NAME.py`` exactly as ``python -m jobs.NAME`` does.
A job names its entry function as ``"module:function"`` and its config class, so ``--help`` and a config error
are answered before the library (torch, Ray) is imported.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import logging
import pkgutil
import runpy
import sys
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from pipeline.config import (
    ConfigError,
    JobError,
    load_config,
    redact_credentials,
    to_dict,
)

T = TypeVar("T")
_job_log = logging.getLogger("pipeline.cli")
HELP_FLAGS = ("-h", "--help")
_invoked_as: str | None = None  # "atr compress" when the atr command runs the job, for --help's usage line


def log(message: str) -> None:
    """A job's own progress line, through the same handler as the library's loggers."""
    _job_log.info(message)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line, not as it was when the handler was made (a job run in a
    process whose stderr is later redirected, or captured by a test, must not write to a stale stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def install_log_handler() -> None:
    """Library modules log through ``logging.getLogger(__name__)``; a job prints their INFO lines to stderr."""
    logger = logging.getLogger("pipeline")
    if not any(getattr(h, "atr_job_handler", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.atr_job_handler = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _parser(prog: str, flags: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--debug", action="store_true")
    for flag in flags:
        parser.add_argument(flag, action="store_true")
    parser.add_argument("overrides", nargs="*")
    return parser


def parse_args(cls: type[T], argv: list[str] | None, prog: str, flags: dict[str, str] | None = None,
               description: str = "") -> tuple[T, bool]:
    """``[--config FILE] [--flag ...] [--debug] key=value ...`` in any order; each ``--flag`` in ``flags`` sets a
    boolean config key. Returns the config and whether ``--debug`` was given; ``--help`` prints the keys."""
    flags = flags or {}
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in argv):
        from pipeline.config_help import help_text

        sys.stdout.write(help_text(cls, _invoked_as or prog, description or (cls.__doc__ or ""), flags))
        sys.exit(0)
    try:
        args = _parser(prog, flags).parse_intermixed_args(argv)
    except SystemExit as exc:
        sys.exit(2 if exc.code else 0)
    overrides = list(args.overrides)
    for flag, key in flags.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            overrides.append(f"{key}=true")
    return load_config(cls, args.config, overrides), args.debug


def config_class(main: Callable[[T], Any]) -> type[T]:
    """The config dataclass a job's entry function takes: the annotation of its first parameter."""
    first = next(iter(inspect.signature(main).parameters))
    return typing.get_type_hints(main)[first]


def entry_function(entry: str | Any) -> Any:
    """``"package.module:name"`` imported (an entry function only once its config is known to be good), or
    ``entry`` itself."""
    if not isinstance(entry, str):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


def _fail(code: int, message: str, debug: bool, summary: bool = True) -> NoReturn:
    """One line on stderr (``--debug``: the traceback first); a runtime failure also ends with a summary."""
    if debug:
        traceback.print_exc()
    prefix = "config error" if code == 2 else "error"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    if summary:
        print(json.dumps({"status": "failed", "error": message}), flush=True)
    sys.exit(code)


def run_job(
    main: str | Callable[[T], dict[str, Any]],
    config: str | type[T] | None = None,
    *,
    argv: list[str] | None = None,
    prog: str = "atr",
    flags: dict[str, str] | None = None,
    description: str = "",
) -> NoReturn:
    """Parse the config ``main`` takes, run ``main``, print its summary as the last stdout line, exit.

    ``main`` is the entry function or its ``"module:function"`` name; with a name, ``config`` is its config
    class or that class's ``"module:Class"`` name (read from the function's annotation otherwise), so a job
    imports nothing of the library but this runner.
    """
    cls = entry_function(config) if config is not None else config_class(entry_function(main))
    install_log_handler()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        config_value, debug = parse_args(cls, argv, prog, flags, description)
    except ConfigError as exc:
        _fail(2, str(exc), debug, summary=False)
    log(f"[{prog}] resolved config: {json.dumps(redact_credentials(to_dict(config_value)), sort_keys=True)}")
    try:
        function = entry_function(main)
        assert config_class(function) is cls, f"{main} takes {config_class(function)}, not {cls}"
        summary = function(config_value)
    except ConfigError as exc:
        _fail(2, str(exc), debug, summary=False)
    except JobError as exc:
        _fail(1, str(exc), debug)
    except Exception as exc:  # noqa: BLE001 - a runtime failure must still end with a summary line
        from pipeline.failures import describe_failure

        known = describe_failure(exc, to_dict(config_value))
        if known is not None:
            code, message = known
            _fail(code, message, debug, summary=code != 2)
        traceback.print_exc()
        print(json.dumps({"status": "failed", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(1)
    print(json.dumps({"status": "ok", **summary}, default=str), flush=True)
    sys.exit(0)


# --------------------------------------------------------------------------------------------- the atr command


def job_names() -> list[str]:
    """Every job module in ``jobs/``, as the ``atr`` subcommand names it (``train_selector`` -> ``train-selector``)."""
    import jobs

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(jobs.__path__) if not m.name.startswith("_"))


def _job_summary(name: str) -> str:
    """The first line of a job module's docstring, read without importing it."""
    import jobs

    source = (Path(jobs.__path__[0]) / f"{name.replace('-', '_')}.py").read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc.strip().splitlines()[0].split(": ``")[0].rstrip(":.") if doc.strip() else ""


def main(argv: list[str] | None = None) -> NoReturn:
    """``atr NAME [--config FILE] [--flag ...] key=value ...``: the job ``jobs.NAME``, as ``python -m`` runs it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = job_names()
    if not argv or argv[0] in HELP_FLAGS:
        print("usage: atr JOB [--config FILE] [--help] [--debug] key=value ...\n\njobs:")
        for name in names:
            print(f"  {name:16s} {_job_summary(name)}")
        print("\n`atr JOB --help` lists the job's keys, their defaults and allowed values.")
        sys.exit(0 if argv else 2)
    name = argv[0].replace("_", "-")
    if name not in names:
        print(f"usage error: atr {argv[0]}: unknown job; jobs: {', '.join(names)}", file=sys.stderr)
        sys.exit(2)
    global _invoked_as
    _invoked_as = f"atr {name}"
    sys.argv = [_invoked_as, *argv[1:]]
    runpy.run_module(f"jobs.{name.replace('-', '_')}", run_name="__main__", alter_sys=True)
    sys.exit(0)
