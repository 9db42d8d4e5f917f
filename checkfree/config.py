"""Validated run configuration: Hydra composes a DictConfig, ``load_run_config`` turns it into dataclasses.

Every check happens here, before any work starts, and each failure is one sentence naming the key, the
bad value and what is allowed (DESIGN §8).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise a ConfigError unless ``ok``: ``<key>=<value> is invalid: <allowed>.``"""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}.")
