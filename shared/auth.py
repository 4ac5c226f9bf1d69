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
        if self.password_file and self.password_env:
            raise Invalid("password_file", "give password_file or password_env, not both")
        if (self.password_file or self.password_env) and not self.username:
            raise Invalid("username", "a password needs a username")
        if self.password_file:
            path = Path(self.password_file)
            if not path.is_file():
                raise Invalid("password_file", f"file not found: {path}")
            if path.stat().st_mode & stat.S_IROTH:
                raise Invalid("password_file", f"{path} is readable by every user (chmod 600 it)")
        if self.password_env and self.password_env not in os.environ:
            raise Invalid(
                "password_env", f"the environment variable {self.password_env} is not set"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.username)

    def password(self) -> str | None:
        """The password, read now (a rotated file is picked up at the next connect)."""
        if self.password_file:
            return Path(self.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        if self.password_env:
            return os.environ.get(self.password_env, "")
        return None


class _Paho(Protocol):
    def username_pw_set(self, username: str | None, password: str | None = None) -> None: ...


def apply_paho(client: _Paho, auth: AuthConfig) -> None:
    """Give a paho client the credentials, if any."""
    if auth.enabled:
        client.username_pw_set(auth.username, auth.password())
