"""The key file, development keys, authentication, reloading and the key command."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudllm_serve.errors import SettingsError
from cloudllm_serve.ingress.access import MALFORMED_HEADER, MISSING_KEY, bearer_key
from cloudllm_serve.ingress.rate_limits import go_duration, limit_headers
from cloudllm_serve.keys import KeyRegistry, Tenant, key_digest
from cloudllm_serve.keys.__main__ import main as keys_main
from cloudllm_serve.keys.registry import parse_key_file
from cloudllm_serve.settings import Settings, load_settings

DIGEST = key_digest("k")


def registry_for(path: Path, data: Any) -> KeyRegistry:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return KeyRegistry(Settings(API_KEYS_FILE=str(path)))


def test_authenticate_finds_tenant_and_key_id(tmp_path: Path) -> None:
    registry = registry_for(
        tmp_path / "keys.yaml",
        {
            "tenants": [
                {
                    "id": "acme",
                    "keys": [
                        {"id": "old", "sha256": key_digest("k1")},
                        {"id": "new", "sha256": key_digest("k2")},
                    ],
                    "requests_per_minute": 5,
                },
                {"id": "ops", "keys": [{"id": "ops-1", "sha256": key_digest("k3")}], "admin": True},
            ]
        },
    )
    assert registry.enabled
    first, second, ops = (registry.authenticate(k) for k in ("k1", "k2", "k3"))
    assert first is not None and second is not None and ops is not None
    assert (first.tenant_id, first.key_id, first.tenant.requests_per_minute) == ("acme", "old", 5)
    assert (second.tenant_id, second.key_id) == ("acme", "new")
    assert ops.tenant.admin and not first.tenant.admin
    assert registry.authenticate("k4") is None
    assert registry.authenticate("") is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("tenants: [", "not valid YAML"),
        ({"tenant": []}, "'tenants' list"),
        ({"tenants": [{"id": "a b", "keys": [{"id": "x", "sha256": DIGEST}]}]}, "tenants[0].id"),
        ({"tenants": [{"id": "a", "keys": []}]}, "tenants[0].keys"),
        ({"tenants": [{"id": "a", "keys": [{"id": "x", "sha256": "abc"}]}]}, "sha256"),
        ({"tenants": [{"id": "a", "keys": [{"id": "x", "key": "plain"}]}]}, "{id, sha256}"),
        (
            {"tenants": [{"id": "a", "keys": [{"id": "x", "sha256": DIGEST}], "rpm": 1}]},
            "unknown field(s) rpm",
        ),
        (
            {
                "tenants": [
                    {"id": "a", "keys": [{"id": "x", "sha256": DIGEST}], "tokens_per_minute": -1}
                ]
            },
            "tokens_per_minute",
        ),
        (
            {
                "tenants": [
                    {"id": "a", "keys": [{"id": "x", "sha256": DIGEST}]},
                    {"id": "b", "keys": [{"id": "y", "sha256": DIGEST}]},
                ]
            },
            "same key appears twice",
        ),
    ],
)
def test_bad_key_file_stops_the_start_naming_the_problem(
    tmp_path: Path, data: Any, problem: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        registry_for(tmp_path / "keys.yaml", data)
    assert "API_KEYS_FILE" in raised.value.message
    assert problem in raised.value.message


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot be read"):
        KeyRegistry(Settings(API_KEYS_FILE=str(tmp_path / "nope.yaml")))


def test_reload_takes_new_keys_and_keeps_old_tenants_on_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    registry = registry_for(
        path, {"tenants": [{"id": "a", "keys": [{"id": "x", "sha256": key_digest("k1")}]}]}
    )
    path.write_text(
        yaml.safe_dump(
            {"tenants": [{"id": "a", "keys": [{"id": "y", "sha256": key_digest("k2")}]}]}
        )
    )
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert registry.authenticate("k1") is not None  # not looked at yet (< RELOAD_CHECK_S)
    registry.refresh(now=time.monotonic() + 60)
    assert registry.authenticate("k1") is None
    assert registry.authenticate("k2") is not None
    path.write_text("tenants: [")
    registry.refresh(now=time.monotonic() + 120)
    assert registry.authenticate("k2") is not None
    assert registry.reload_error is not None
    assert registry.loads == 2


def test_dev_keys_are_one_admin_tenant_and_never_printed() -> None:
    registry = KeyRegistry(Settings(API_KEYS="alpha, beta"))
    alpha, beta = registry.authenticate("alpha"), registry.authenticate("beta")
    assert alpha is not None and beta is not None
    assert alpha.tenant_id == beta.tenant_id == "default"
    assert alpha.tenant.admin and not alpha.tenant.limited
    assert (alpha.key_id, beta.key_id) == ("dev-0", "dev-1")
    settings = Settings(API_KEYS="alpha")
    assert "alpha" not in repr(settings) and "alpha" not in str(settings.model_dump())


def test_no_keys_means_auth_off() -> None:
    registry = KeyRegistry(Settings())
    assert not registry.enabled and registry.tenants == []


def test_empty_api_keys_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", " , ")
    with pytest.raises(SettingsError, match="holds no key"):
        load_settings()
    monkeypatch.setenv("API_KEYS", "secret-value")
    monkeypatch.setenv("VLLM_MAX_NUM_SEQS", "x")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "secret-value" not in raised.value.message


def test_key_command_prints_a_key_that_its_entry_authenticates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys_main(["new", "--tenant", "acme", "--key-id", "acme-1"]) == 0
    out = capsys.readouterr().out
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("sk-cllm-"))
    entry = out[out.index("tenants:") :]
    assert key not in entry
    path = tmp_path / "keys.yaml"
    path.write_text(entry)
    principal = KeyRegistry(Settings(API_KEYS_FILE=str(path))).authenticate(key)
    assert principal is not None and (principal.tenant_id, principal.key_id) == ("acme", "acme-1")
    assert parse_key_file(yaml.safe_load(entry), "x").tenants[0].id == "acme"


def test_key_command_refuses_a_bad_tenant_id() -> None:
    with pytest.raises(SystemExit):
        keys_main(["new", "--tenant", "a b"])


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (None, MISSING_KEY)),
        (b"Bearer abc", ("abc", None)),
        (b"bearer   abc ", ("abc", None)),
        (b"Basic abc", (None, MALFORMED_HEADER)),
        (b"Bearer", (None, MALFORMED_HEADER)),
        (b"Bearer a b", (None, MALFORMED_HEADER)),
        ("Bearer \u00e9".encode(), (None, MALFORMED_HEADER)),
    ],
)
def test_bearer_key(header: bytes | None, expected: tuple[str | None, str | None]) -> None:
    assert bearer_key(header) == expected


def test_openai_style_durations_and_headers() -> None:
    assert [go_duration(x) for x in (0.017, 1.0, 12.5, 60.0, 359.25)] == [
        "17ms",
        "1s",
        "12.5s",
        "1m0s",
        "5m59.25s",
    ]
    tenant = Tenant("t", requests_per_minute=10, tokens_per_minute=0)
    assert limit_headers(tenant, 3, 0, 1.5) == [
        ("x-ratelimit-limit-requests", "10"),
        ("x-ratelimit-remaining-requests", "7"),
        ("x-ratelimit-reset-requests", "1.5s"),
    ]
