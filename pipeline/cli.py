"""The one way jobs start and end: parse config, run, print a JSON summary, map errors to exit codes.

Exit 0 on success, 2 on usage or config errors (one line on stderr, no traceback), 1 on runtime failure.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
import traceback
import typing
from typing import Any, Callable, NoReturn, TypeVar

from pipeline.config import ConfigError, JobError, load_config, to_dict

T = TypeVar("T")
_job_log = logging.getLogger("pipeline.cli")


def log(message: str) -> None:
    """A job's own progress line, through the same handler as the library's loggers."""
    _job_log.info(message)


def install_log_handler() -> None:
    """Library modules log through ``logging.getLogger(__name__)``; a job prints their INFO lines to stderr."""
    logger = logging.getLogger("pipeline")
    if not any(getattr(h, "atr_job_handler", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.atr_job_handler = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def parse_args(cls: type[T], argv: list[str] | None, prog: str, flags: dict[str, str] | None = None) -> T:
    """``[--config FILE] [--flag ...] key=value ...``; each ``--flag`` in ``flags`` sets a boolean config key."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip() or None)
    parser.add_argument("--config", help="YAML file merged over the defaults")
    for flag, key in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=f"same as {key}=true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        sys.exit(2 if exc.code else 0)
    overrides = list(args.overrides)
    for flag, key in (flags or {}).items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            overrides.append(f"{key}=true")
    return load_config(cls, args.config, overrides)


def config_class(main: Callable[[T], Any]) -> type[T]:
    """The config dataclass a job's entry function takes: the annotation of its first parameter."""
    first = next(iter(inspect.signature(main).parameters))
    return typing.get_type_hints(main)[first]


def run_job(
    main: Callable[[T], dict[str, Any]],
    argv: list[str] | None = None,
    prog: str = "atr",
    flags: dict[str, str] | None = None,
) -> NoReturn:
    """Parse the config ``main`` takes, run ``main``, print its summary as the last stdout line, exit."""
    cls = config_class(main)
    install_log_handler()
    try:
        config = parse_args(cls, argv, prog, flags)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    log(f"[{prog}] resolved config: {json.dumps(to_dict(config), sort_keys=True)}")
    try:
        summary = main(config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        print(json.dumps({"status": "failed", "error": str(exc)}), flush=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - a runtime failure must still end with a summary line
        traceback.print_exc()
        print(json.dumps({"status": "failed", "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        sys.exit(1)
    print(json.dumps({"status": "ok", **summary}, default=str), flush=True)
    sys.exit(0)
