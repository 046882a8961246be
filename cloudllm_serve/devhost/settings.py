"""The development host's settings: how ``make serve`` shares a small CPU host's cores.

They are not the app's :class:`~cloudllm_serve.settings.Settings` (no replica reads
them): the launcher takes them from the profile's top-level ``devhost:`` section (which
Serve ignores), the environment winning, and hands them to ``serve_run`` in its
environment (:mod:`cloudllm_serve.devhost.cpu_priority`,
:mod:`cloudllm_serve.devhost.cpu_affinity`).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from cloudllm_serve.errors import SettingsError

#: The profile's section these come from.
PROFILE_SECTION = "devhost"


class HostSettings(BaseSettings):
    """CPU priority and placement of the serving layer on one machine."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="forbid", frozen=True)

    SERVING_NICENESS: int = Field(
        0,
        ge=0,
        le=19,
        description="nice value of the serving layer (Ray's daemons, Serve's controller and "
        "proxy, ingress replicas, engine replicas' own threads once vLLM has started), so "
        "that vLLM's engine processes win the CPU when it is short",
    )
    ENGINE_NICENESS: int = Field(
        0,
        ge=0,
        le=19,
        description="nice value of vLLM's engine processes once their replica has started "
        "(a new replica starts at full priority): keeps the HTTP front door and Redis "
        "responsive when several engines saturate the cores",
    )
    SERVING_OFF_ENGINE_CPUS: bool = Field(
        False,
        description="keep the serving layer off the cores vLLM's CPU build binds its "
        "workers to, on the cores vLLM reserves for the rest (no effect where workers are "
        "not bound)",
    )

    @classmethod
    def from_environment(cls) -> HostSettings:
        """The settings the environment gives (``serve_run`` reads them so)."""
        return cls()  # type: ignore[call-arg]  # fields come from the environment

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> HostSettings:
        """The profile's ``devhost:`` section, each variable set in the environment winning."""
        section = profile.get(PROFILE_SECTION) or {}
        if not isinstance(section, dict):
            raise SettingsError(f"the profile's {PROFILE_SECTION!r} section is not a mapping")
        try:
            return cls(**{name: value for name, value in section.items() if name not in os.environ})
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
            )
            raise SettingsError(f"invalid {PROFILE_SECTION} settings: {problems}") from None

    def environment(self) -> dict[str, str]:
        """These settings as variables, read back by :meth:`from_environment`."""
        return {
            "SERVING_NICENESS": str(self.SERVING_NICENESS),
            "ENGINE_NICENESS": str(self.ENGINE_NICENESS),
            "SERVING_OFF_ENGINE_CPUS": "true" if self.SERVING_OFF_ENGINE_CPUS else "false",
        }
