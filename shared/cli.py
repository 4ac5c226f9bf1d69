"""Helpers the three console commands share: logging setup and config loading
that turns a :class:`ConfigError` into a one-line message and exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

import click

from shared.config import load_config
from shared.errors import ConfigError
from shared.logs import setup_logging as setup_logging  # re-exported for the commands

T = TypeVar("T")

#: Exit codes shared by every command (documented in the README).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


#: Where the Ansible roles (docs/deploy.md) put each command's config.
CONFIG_DIR = Path("/etc/iot-telemetry")


def load_or_exit(cls: type[T], path: str | Path | None, default: Path | None = None) -> T:
    """Load ``path``; without one, ``default`` if that file exists, else the built-in
    defaults. A bad config is one line naming the file and the key, and exit 2."""
    if path is None and default is not None and default.is_file():
        path = default
    try:
        return load_config(cls, path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)


def write_ready_file(path: str | Path | None) -> None:
    """Create ``path`` (atomically) to tell a supervisor that start-up is complete."""
    if path is None:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text("ready\n")
    tmp.replace(path)


def config_group(cls: type[Any], package: str) -> click.Group:
    """The ``config check`` / ``config sample`` commands, the same for every component."""

    @click.group("config")
    def config() -> None:
        """Check a config file or print the commented sample."""

    @config.command("check")
    @click.argument("path", type=click.Path(dir_okay=False))
    def check(path: str) -> None:
        """Load PATH and report the first problem, naming the key (exit 2), or 'ok'."""
        load_or_exit(cls, path)
        click.echo(f"{path}: ok")

    @config.command("sample")
    def sample() -> None:
        """Print the sample config, with a comment on every key."""
        click.echo(sample_path(package).read_text(), nl=False)

    return config


def sample_path(package: str) -> Path:
    """The commented sample config shipped inside ``package``."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {package} not found")
    return Path(spec.origin).parent / "sample.toml"
