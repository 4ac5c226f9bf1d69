"""MQTT username and password: one config table, the secret kept out of the config.

``[<broker>.auth]`` in any of the project's configs::

    username = "device-7"
    password_file = "/etc/telemetry/mqtt-password"   # one line; mode 0600 or 0640
    # or: password_env = "MQTT_PASSWORD"

The config names where the password is, never the password itself, so a config
file can be shared, versioned and printed (``config check``) without leaking it.
:meth:`AuthConfig.password` reads it when a client connects; it is never logged.
A password file readable by every user is refused, as ssh refuses such a key.
Client certificates are the other way to authenticate (``[<broker>.tls]``).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.config import Invalid


@dataclass(frozen=True)
class AuthConfig:
    username: str = ""
    password_file: str = ""
    password_env: str = ""

    def __post_init__(self) -> None:
        check_secret("password", "", self.password_file, self.password_env)
        if (self.password_file or self.password_env) and not self.username:
            raise Invalid("username", "a password needs a username")

    @property
    def enabled(self) -> bool:
        return bool(self.username)

    def password(self) -> str | None:
        """The password, read now (a rotated file is picked up at the next connect)."""
        if not (self.password_file or self.password_env):
            return None
        return read_secret("", self.password_file, self.password_env)


def check_secret(key: str, inline: str, file: str, env: str) -> None:
    """At most one of ``<key>``, ``<key>_file`` and ``<key>_env``; the file present and
    not readable by every user, the variable set. Raises :class:`Invalid`."""
    if sum(map(bool, (inline, file, env))) > 1:
        raise Invalid(f"{key}_file", f"give one of {key}, {key}_file and {key}_env")
    if file:
        path = Path(file)
        if not path.is_file():
            raise Invalid(f"{key}_file", f"file not found: {path}")
        if path.stat().st_mode & stat.S_IROTH:
            raise Invalid(f"{key}_file", f"{path} is readable by every user (chmod 600 it)")
    if env and env not in os.environ:
        raise Invalid(f"{key}_env", f"the environment variable {env} is not set")


def read_secret(inline: str, file: str, env: str) -> str:
    """The secret from wherever the config says it is ("" if nowhere)."""
    if file:
        return Path(file).read_text(encoding="utf-8").rstrip("\r\n")
    if env:
        return os.environ.get(env, "")
    return inline


def read_key(key: str, file: str, env: str) -> bytes | None:
    """A key of at least 32 bytes, written as hex, from ``<key>_file`` or ``<key>_env``
    (None if neither is set). Raises :class:`Invalid` naming the setting."""
    check_secret(key, "", file, env)
    if not (file or env):
        return None
    text = read_secret("", file, env).strip()
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise Invalid(f"{key}_file" if file else f"{key}_env", "not a hex string") from None
    if len(value) < 32:
        raise Invalid(f"{key}_file" if file else f"{key}_env", "shorter than 32 bytes (64 hex)")
    return value


class _Paho(Protocol):
    def username_pw_set(self, username: str | None, password: str | None = None) -> None: ...


def apply_paho(client: _Paho, auth: AuthConfig) -> None:
    """Give a paho client the credentials, if any."""
    if auth.enabled:
        client.username_pw_set(auth.username, auth.password())
