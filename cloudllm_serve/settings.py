"""All settings of the service, read from the environment and validated at start-up.

Field names are the environment variable names (README.md, "Configuration"), so an
error message that names a field names the variable to fix. The rest of the project receives a
:class:`Settings` instance as an argument; the one other variable read is
``CLOUDLLM_CACHE_DIR`` (where prepared models and ``make serve``'s Redis data live,
:mod:`cloudllm_serve.local_models`), needed before settings exist.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import (
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cloudllm_serve.conversations.redis_connect import parse_host_ports
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.local_models import (
    LOCAL_MODELS,
    SIMULATED_MODEL,
    cache_root,
    default_model_dir,
    local_model_dir,
)

MiB = 1024 * 1024
#: Settings read from this file in the directory the app is started in (the environment wins).
ENV_FILE = ".env"

logger = logging.getLogger(__name__)

# vLLM's CPU attention backend only accepts KV-cache blocks of a multiple of 32 tokens.
CPU_BLOCK_SIZE_MULTIPLE = 32


def _default_model() -> str:
    return str(default_model_dir())


def _default_audit_log() -> str:
    return str(cache_root() / "run" / "audit.jsonl")


def _is_host_name(host: str) -> bool:
    """A bare host name or IP address (no scheme, port, path or user)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return not any(mark in host for mark in ":/@?# ")
    return True


class Settings(BaseSettings):
    """The service's configuration; each field is the environment variable of that name."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    # HTTP
    LLM_HOST: str = Field("0.0.0.0", min_length=1, description="address the HTTP server binds")
    LLM_PORT: int = Field(8001, ge=1, le=65535, description="port of the HTTP server")

    METRICS_EXPORT_PORT: int = Field(
        8080,
        ge=1,
        le=65535,
        description="launcher: port of Ray's metrics agent (Prometheus text at /metrics)",
    )
    METRICS_EXPORT_HOST: Literal["127.0.0.1", "0.0.0.0"] = Field(
        "127.0.0.1",
        description="launcher: where Ray's metrics agent listens: 127.0.0.1 (this machine "
        "only; the cluster's Ray node address is then 127.0.0.1) or 0.0.0.0 (every interface, "
        "for a Prometheus on another host); Ray binds no other address",
    )
    METRICS_TENANT_LABELS: bool = Field(
        True,
        description="label cloudllm_tokens_total by tenant id (false: by kind only, for a "
        "metrics endpoint that others may read)",
    )
    METRICS_ENABLED: bool = Field(
        True,
        description="export vLLM's and our metrics through Ray's metrics agent "
        "(false: nothing exported; for measuring their cost)",
    )
    SERVE_DIRECT_INGRESS: bool = Field(
        False,
        description="launcher: the ingress replica serves LLM_PORT itself (no Serve proxy hop)",
    )
    SERVE_LATENCY_TUNING: bool = Field(
        True,
        description="launcher: Ray Serve's low-latency switches (see launcher.LATENCY_TUNING)",
    )

    # Model and engine
    LLM_MODEL: str = Field(
        default_factory=_default_model,
        min_length=1,
        description="Hugging Face model id, local folder, or a prepared local model's name "
        "(test-vlm: a tiny Qwen2.5-VL; sim: the simulated engine; default: the prepared "
        "SmolLM2)",
    )
    LLM_SERVED_MODEL_NAME: str | None = Field(
        None, description="name reported as model_name (default: the model id or folder name)"
    )
    ENGINE_DEVICE: Literal["gpu", "cpu"] = Field(
        "gpu", description="gpu: replicas reserve VLLM_TENSOR_PARALLEL_SIZE GPUs; cpu: none"
    )
    VLLM_MAX_MODEL_LEN: int = Field(2048, ge=16, description="max sequence length")
    VLLM_MAX_NUM_SEQS: int = Field(16, ge=1, description="max sequences in flight per engine")
    VLLM_BLOCK_SIZE: int = Field(16, ge=1, le=1024, description="KV-cache block size (tokens)")
    VLLM_GPU_MEMORY_UTILIZATION: float = Field(
        0.9, gt=0.0, le=1.0, description="fraction of accelerator memory vLLM may take"
    )
    VLLM_TENSOR_PARALLEL_SIZE: int = Field(1, ge=1, le=64, description="GPUs per engine replica")
    VLLM_ENFORCE_EAGER: bool = Field(False, description="skip torch.compile/CUDA graphs")
    VLLM_KV_CACHE_MEMORY_BYTES: int | None = Field(
        None, ge=MiB, description="fixed KV-cache size in bytes (needed on small CPU hosts)"
    )
    VLLM_TOOL_CALL_PARSER: str = Field(
        "hermes",
        description="vLLM tool-call parser for tool_choice auto (vllm serve "
        "--tool-call-parser); empty turns auto tool choice off",
    )
    VLLM_ENGINE_KWARGS: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="JSON object of further vLLM engine arguments (quantization, dtype, "
        "max_num_batched_tokens, ...); checked against vLLM's at start-up",
    )

    # The simulated engine (LLM_MODEL=sim; cloudllm_serve/engine/simulated.py). Defaults
    # resemble a 7-8B model on one H100/H200 (docs/performance.md, "The serving layer's
    # ceiling").
    SIM_TTFT_MS: float = Field(
        20.0, ge=0.0, le=60_000.0, description="simulated engine: time to first token (ms)"
    )
    SIM_TTFT_MS_PER_TOKEN: float = Field(
        0.1, ge=0.0, le=100.0, description="simulated engine: added TTFT per uncached prompt token"
    )
    SIM_STEP_MS: float = Field(
        12.0, ge=0.0, le=10_000.0, description="simulated engine: one decode step (ms)"
    )
    SIM_STEP_MS_PER_SEQ: float = Field(
        0.02, ge=0.0, le=100.0, description="simulated engine: added step time per running sequence"
    )
    SIM_JITTER: float = Field(
        0.0, ge=0.0, le=1.0, description="simulated engine: relative spread of each time"
    )
    SIM_STARTUP_S: float = Field(
        0.0, ge=0.0, le=3600.0, description="simulated engine: a replica's start-up time"
    )
    SIM_PRESET: Literal["default", "ceiling"] = Field(
        "default", description="simulated engine: ceiling = no compute time at all"
    )
    SIM_CRASH_AFTER_TOKENS: int = Field(
        0,
        ge=0,
        description="simulated engine: a replica's engine dies after this many tokens (0: never)",
    )
    SIM_REPLICA_CPUS: float = Field(
        0.5,
        gt=0.0,
        le=64.0,
        description="simulated engine: the CPU an engine replica reserves in Ray (bookkeeping; "
        "0.1 lets 16 replicas be placed on 2 cores)",
    )

    # Streams between engine replica and ingress (docs/performance.md)
    STREAM_BATCH_INTERVAL_MS: float = Field(
        20.0,
        ge=0.0,
        le=1000.0,
        description="after a stream's first item, items are gathered this long (at most) into "
        "one handle item and one HTTP write (0: one item per engine step)",
    )
    STREAM_BATCH_MAX_ITEMS: int = Field(
        64, ge=1, le=10_000, description="most stream items gathered into one"
    )

    # Scaling of the engine deployment (docs/deployment.md). A replica is full at
    # VLLM_MAX_NUM_SEQS sequences; Serve adds replicas when requests pile up past that.
    ENGINE_MIN_REPLICAS: int = Field(1, ge=1, le=1024, description="fewest engine replicas")
    ENGINE_MAX_REPLICAS: int = Field(1, ge=1, le=1024, description="most engine replicas")
    ENGINE_UPSCALE_DELAY_S: float = Field(
        10.0, ge=0.0, description="how long load must stay high before a replica is added"
    )
    ENGINE_DOWNSCALE_DELAY_S: float = Field(
        300.0, ge=0.0, description="how long load must stay low before a replica is removed"
    )
    ENGINE_AUTOSCALING_LOOK_BACK_S: float = Field(
        10.0, gt=0.0, description="window over which pending requests are averaged"
    )
    ENGINE_MAX_QUEUED_REQUESTS: int = Field(
        64,
        ge=1,
        description="requests each ingress replica may queue for busy engines; more get 503/429",
    )
    ENGINE_PLACEMENT_STRATEGY: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="placement group strategy of a tensor-parallel replica"
    )
    ENGINE_NODE_RESOURCE: str = Field(
        "",
        max_length=128,
        description="a custom Ray resource (e.g. cloudllm_engine) each engine replica asks one "
        "unit of, so replicas run only on nodes started with it (ray start --resources); "
        "empty: none",
    )
    INGRESS_NODE_RESOURCE: str = Field(
        "",
        max_length=128,
        description="a custom Ray resource (e.g. cloudllm_ingress) each ingress replica asks "
        "one unit of, so ingress replicas run only on nodes started with it; empty: none",
    )
    ENGINE_GRACEFUL_SHUTDOWN_S: float = Field(
        60.0, ge=0.0, description="how long a stopping engine/ingress replica lets requests finish"
    )
    INGRESS_REPLICAS: int = Field(1, ge=1, le=1024, description="ingress (HTTP) replicas")
    INGRESS_MAX_ONGOING_REQUESTS: int = Field(
        2048,
        ge=1,
        le=1_000_000,
        description="requests (streams included) one ingress replica handles at once; the "
        "engine queue, not this, bounds waiting (ENGINE_MAX_QUEUED_REQUESTS)",
    )
    ROUTING_AFFINITY: bool = Field(
        True, description="send a conversation's turns to the engine replica that has its prefix"
    )
    ROUTING_LOAD_BOUND: float = Field(
        2.0,
        ge=1.0,
        le=100.0,
        description="a conversation's replica keeps it while its ongoing requests stay under "
        "this many times the mean (then the next replica in the key's order takes it)",
    )

    # Overload and time limits
    OVERLOAD_STATUS_CODE: int = Field(
        503, description="status (503 or 429) of a request refused because the queue is full"
    )
    OVERLOAD_RETRY_AFTER_S: int = Field(
        2, ge=1, le=3600, description="Retry-After (seconds) on an overload refusal"
    )
    REQUEST_TIMEOUT_S: float = Field(
        300.0, gt=0.0, description="longest a generation may take, queueing included"
    )
    ADMISSION_POLL_INTERVAL_S: float = Field(
        1.0,
        ge=0.0,
        le=60.0,
        description="how often each ingress replica reads the engines' stats to refuse "
        "requests that would not finish within REQUEST_TIMEOUT_S (0: no such refusals)",
    )
    REQUEST_BODY_TIMEOUT_S: float = Field(
        60.0,
        gt=0.0,
        le=3600.0,
        description="longest a request body may take to arrive after its headers (408, "
        "and the connection is closed)",
    )

    # Request limits
    MAX_TOKENS_CAP: int = Field(512, ge=1, description="upper bound on max_tokens")
    MAX_UPLOAD_BYTES: int = Field(
        10 * MiB, ge=1024, description="largest accepted request body, and largest image (413)"
    )
    MAX_JSON_SCHEMA_BYTES: int = Field(
        64 * 1024,
        ge=1024,
        description="largest json_schema of /generate, /vision, /multimodal as compact JSON "
        "(400 past it; checking one costs ~4 ms of CPU per KiB)",
    )

    # Images (vision-language models)
    MAX_IMAGE_SIDE: int = Field(
        1280, ge=28, le=16384, description="longest image side after downscaling"
    )
    MAX_IMAGE_PIXELS: int = Field(
        50_000_000, ge=1024, description="most pixels an uploaded image may have (400 past it)"
    )
    MAX_IMAGES_PER_REQUEST: int = Field(
        4, ge=1, le=64, description="most images in one request (400 past it)"
    )
    MEDIA_ALLOWED_DOMAINS: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts image_url may fetch http(s) images from, comma-separated "
        "(empty: no remote fetch at all)",
    )
    MEDIA_ALLOWED_NETWORKS: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        default_factory=list,
        description="comma-separated CIDRs a remote image's host may resolve to although "
        "they are not public (private, loopback, link-local, CGNAT...; empty: none)",
    )
    MEDIA_ALLOWED_PORTS: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [80, 443],
        description="comma-separated ports remote images may be fetched from",
    )
    MEDIA_FETCH_TIMEOUT_S: float = Field(
        10.0, gt=0.0, le=300.0, description="longest a remote image fetch may take"
    )
    VLLM_LIMIT_IMAGES_PER_PROMPT: int = Field(
        8, ge=1, le=256, description="most images in one prompt, history included (vLLM)"
    )
    VLLM_MM_PROCESSOR_KWARGS: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description='JSON: vLLM\'s mm_processor_kwargs, e.g. {"max_pixels": 501760}',
    )

    # Conversation store
    REDIS_URL: str = Field(
        "redis://127.0.0.1:6380/0",
        pattern=r"^(redis|rediss|unix)://",
        description="Redis that keeps the conversations",
    )
    # 1 s proved too tight on a loaded 2-core host (Redis PING peaked at 1.3 s while
    # vLLM saturated the cores); a frozen Redis still costs a request only this long.
    REDIS_TIMEOUT_S: float = Field(
        3.0, gt=0.0, le=60.0, description="connect/read timeout of one Redis call"
    )
    REDIS_MAX_CONNECTIONS: int = Field(
        100,
        ge=1,
        le=10_000,
        description="most connections one process opens to one Redis node; a call beyond "
        "waits up to REDIS_TIMEOUT_S for a free one (Redis Cluster: refused, a 503)",
    )
    REDIS_SENTINELS: str = Field(
        "",
        description="comma-separated host:port of Redis Sentinels; set with "
        "REDIS_SENTINEL_MASTER, the store follows the primary they name (REDIS_URL then "
        "gives only user, password and database)",
    )
    REDIS_SENTINEL_MASTER: str = Field(
        "", description="the name the sentinels monitor the primary under"
    )
    REDIS_CLUSTER: bool = Field(
        False, description="REDIS_URL is a seed node of a Redis Cluster (redis-py's cluster client)"
    )
    REDIS_MIN_REPLICAS_ACK: int = Field(
        0,
        ge=0,
        le=16,
        description="replicas that must hold a write (WAIT) before a turn is answered "
        "(0: answer once the primary has it)",
    )
    REDIS_ACK_TIMEOUT_MS: int = Field(
        1000,
        ge=1,
        le=60_000,
        description="longest a write waits for REDIS_MIN_REPLICAS_ACK replicas (then 503)",
    )

    # Keys, tenants, retention, audit (docs/security.md)
    API_KEYS_FILE: str | None = Field(
        None,
        min_length=1,
        description="YAML file of tenants and the SHA-256 digests of their keys; auth is on "
        "when set (re-read within 30 s of a change)",
    )
    API_KEYS: SecretStr | None = Field(
        None,
        description="development: comma-separated plaintext keys of one tenant 'default'",
    )
    MAX_CONVERSATIONS: int = Field(
        10_000,
        ge=0,
        description="conversations a tenant may keep (409 past it; 0: unlimited); a key "
        "file's max_conversations overrides it per tenant",
    )
    MAX_MESSAGES_PER_CONVERSATION: int = Field(
        1_000,
        ge=0,
        description="messages one conversation may hold, answers included (409 past it; "
        "0: unlimited); key file: max_messages_per_conversation",
    )
    MAX_IMAGE_BYTES: int = Field(
        256 * MiB,
        ge=0,
        description="bytes of stored images a tenant may keep, all its conversations "
        "together (409 past it; 0: unlimited); key file: max_image_bytes",
    )
    REDIS_MAXMEMORY: str = Field(
        "1gb",
        pattern=r"^(0|[1-9][0-9]*(b|kb|mb|gb|k|m|g)?)$",
        description="launcher: maxmemory of the Redis make serve starts (noeviction: a full "
        "Redis refuses writes with 503 rather than dropping stored turns; 0: no limit)",
    )
    CONVERSATION_TTL_S: int = Field(
        0,
        ge=0,
        le=10 * 365 * 86400,
        description="a conversation without a new turn this long is deleted (0: kept)",
    )
    AUDIT_LOG: str = Field(
        default_factory=_default_audit_log,
        min_length=1,
        description="where the audit log's JSON lines go: a file path (appended to; default "
        "audit.jsonl in the run folder, $CLOUDLLM_CACHE_DIR/run), 'stderr' (the ingress "
        "replica's log, so make serve's console), or 'off'",
    )

    @field_validator("LLM_MODEL")
    @classmethod
    def _resolve_local_model(cls, value: str) -> str:
        if value in LOCAL_MODELS:
            return str(local_model_dir(value))
        return value

    @field_validator("MEDIA_ALLOWED_DOMAINS", mode="before")
    @classmethod
    def _parse_domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if not isinstance(value, list):
            raise ValueError("must be a comma-separated list of host names")
        hosts = [str(host).strip().lower().rstrip(".").strip("[]") for host in value]
        bad = [host for host in hosts if host and not _is_host_name(host)]
        if bad:
            raise ValueError(f"host names only, without scheme, port or path: {bad[0]!r}")
        return [host for host in hosts if host]

    @field_validator("MEDIA_ALLOWED_NETWORKS", "MEDIA_ALLOWED_PORTS", mode="before")
    @classmethod
    def _parse_comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("MEDIA_ALLOWED_PORTS")
    @classmethod
    def _check_ports(cls, value: list[int]) -> list[int]:
        bad = [port for port in value if not 1 <= port <= 65535]
        if bad:
            raise ValueError(f"ports are 1-65535: {bad[0]}")
        return value

    @field_validator("VLLM_ENGINE_KWARGS", "VLLM_MM_PROCESSOR_KWARGS", mode="before")
    @classmethod
    def _parse_engine_kwargs(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object, e.g. {"dtype": "bfloat16"}')
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.MAX_TOKENS_CAP >= self.VLLM_MAX_MODEL_LEN:
            raise ValueError(
                f"MAX_TOKENS_CAP ({self.MAX_TOKENS_CAP}) must be below "
                f"VLLM_MAX_MODEL_LEN ({self.VLLM_MAX_MODEL_LEN}) to leave room for the prompt"
            )
        if self.ENGINE_DEVICE == "cpu" and self.VLLM_BLOCK_SIZE % CPU_BLOCK_SIZE_MULTIPLE:
            raise ValueError(
                f"VLLM_BLOCK_SIZE ({self.VLLM_BLOCK_SIZE}) must be a multiple of "
                f"{CPU_BLOCK_SIZE_MULTIPLE} when ENGINE_DEVICE=cpu (vLLM's CPU attention)"
            )
        if self.OVERLOAD_STATUS_CODE not in (503, 429):
            raise ValueError(
                f"OVERLOAD_STATUS_CODE ({self.OVERLOAD_STATUS_CODE}) must be 503 or 429"
            )
        if self.ENGINE_MIN_REPLICAS > self.ENGINE_MAX_REPLICAS:
            raise ValueError(
                f"ENGINE_MIN_REPLICAS ({self.ENGINE_MIN_REPLICAS}) must not exceed "
                f"ENGINE_MAX_REPLICAS ({self.ENGINE_MAX_REPLICAS})"
            )
        if self.ENGINE_DEVICE == "cpu" and self.VLLM_TENSOR_PARALLEL_SIZE > 1:
            raise ValueError(
                f"VLLM_TENSOR_PARALLEL_SIZE ({self.VLLM_TENSOR_PARALLEL_SIZE}) needs "
                "ENGINE_DEVICE=gpu: ranks are placed through vLLM's Ray executor, which "
                "vLLM refuses on CPU ('current platform cpu does not support ray')"
            )
        if self.SERVE_DIRECT_INGRESS and self.INGRESS_REPLICAS > 1:
            raise ValueError(
                f"SERVE_DIRECT_INGRESS serves one ingress replica on LLM_PORT; with "
                f"INGRESS_REPLICAS={self.INGRESS_REPLICAS} set SERVE_DIRECT_INGRESS=false "
                "so the Serve proxy spreads requests over them"
            )
        if self.MAX_IMAGES_PER_REQUEST > self.VLLM_LIMIT_IMAGES_PER_PROMPT:
            raise ValueError(
                f"MAX_IMAGES_PER_REQUEST ({self.MAX_IMAGES_PER_REQUEST}) must not exceed "
                f"VLLM_LIMIT_IMAGES_PER_PROMPT ({self.VLLM_LIMIT_IMAGES_PER_PROMPT})"
            )
        self._check_redis_topology()
        if self.API_KEYS is not None and not any(
            key.strip() for key in self.API_KEYS.get_secret_value().split(",")
        ):
            raise ValueError("API_KEYS is set but holds no key (comma-separated keys)")
        return self

    def _check_redis_topology(self) -> None:
        """The ``REDIS_*`` settings name one topology, each part well formed."""
        if bool(self.REDIS_SENTINELS.strip()) != bool(self.REDIS_SENTINEL_MASTER.strip()):
            raise ValueError(
                "REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together: set both (Sentinel) "
                "or neither (REDIS_URL names the Redis)"
            )
        if self.REDIS_SENTINELS.strip():
            try:
                parse_host_ports(self.REDIS_SENTINELS)
            except ValueError as error:
                raise ValueError(f"REDIS_SENTINELS={self.REDIS_SENTINELS!r}: {error}") from None
            if self.REDIS_CLUSTER:
                raise ValueError(
                    "REDIS_CLUSTER=true and REDIS_SENTINELS are exclusive: a Redis Cluster "
                    "fails over by itself"
                )
        if self.REDIS_CLUSTER and not self.REDIS_URL.startswith(("redis://", "rediss://")):
            raise ValueError("REDIS_CLUSTER=true needs REDIS_URL=redis://host:port of a node")
        if self.REDIS_CLUSTER and urlparse(self.REDIS_URL).path.strip("/") not in ("", "0"):
            raise ValueError("REDIS_CLUSTER=true: a Redis Cluster has database 0 only")
        if self.REDIS_MIN_REPLICAS_ACK and self.REDIS_ACK_TIMEOUT_MS >= self.REDIS_TIMEOUT_S * 1000:
            raise ValueError(
                f"REDIS_ACK_TIMEOUT_MS ({self.REDIS_ACK_TIMEOUT_MS}) must be below "
                f"REDIS_TIMEOUT_S ({self.REDIS_TIMEOUT_S} s): the WAIT for replicas is read "
                "within one Redis call's timeout"
            )

    @property
    def auth_enabled(self) -> bool:
        """Whether requests need an API key (a key file or development keys configured)."""
        return self.API_KEYS_FILE is not None or self.API_KEYS is not None

    @property
    def simulated(self) -> bool:
        """Whether the engine is the simulated one (``LLM_MODEL=sim``)."""
        return self.LLM_MODEL == SIMULATED_MODEL

    @property
    def engine_type(self) -> Literal["vLLM", "simulated"]:
        """What generates: ``vLLM`` on a model, ``simulated`` without one."""
        return "simulated" if self.simulated else "vLLM"

    @property
    def engine_model(self) -> str:
        """The model vLLM loads: the default model's folder for the simulator's tokenizer."""
        return str(default_model_dir()) if self.simulated else self.LLM_MODEL

    @property
    def model_name(self) -> str:
        """The name clients see: ``LLM_SERVED_MODEL_NAME``, else the id or folder name."""
        if self.LLM_SERVED_MODEL_NAME:
            return self.LLM_SERVED_MODEL_NAME
        if self.simulated:
            return SIMULATED_MODEL
        path = Path(self.LLM_MODEL).expanduser()
        return path.name if path.is_absolute() or path.exists() else self.LLM_MODEL


#: Settings whose values never appear in a message or a log line.
SECRET_SETTINGS = frozenset({"API_KEYS"})


def describe_validation_error(error: ValidationError) -> str:
    """Turn a pydantic error into lines that each name the variable at fault."""
    lines = []
    for item in error.errors(include_url=False):
        loc = item.get("loc") or ()
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if loc:
            value = "'***'" if loc[0] in SECRET_SETTINGS else repr(item.get("input"))
            lines.append(f"{loc[0]}={value}: {message}")
        else:
            lines.append(message)
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(
    defaults: Mapping[str, Any] | None = None, *, env_file: str | Path | None = ENV_FILE
) -> Settings:
    """Read and validate the settings.

    From lowest to highest precedence: the built-in defaults; ``defaults`` (a serve
    config's ``args``); ``env_file`` (``.env`` in the directory the app is started in,
    read as pydantic-settings reads it, when it exists); the environment. So an operator
    can change any setting of a checked-in profile without editing it. The result
    reaches every replica as the application's argument, not by re-reading the file.

    Raises :class:`SettingsError` with a message naming every bad variable.
    """
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(f"invalid settings: unknown setting(s) {', '.join(unknown)}")
    in_file = env_file_settings(env_file)
    overridden = set(os.environ) | in_file
    kept = {k: v for k, v in defaults.items() if k not in overridden}
    try:
        return Settings(_env_file=env_file if in_file else None, **kept)  # type: ignore[call-arg]
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None


def env_file_settings(env_file: str | Path | None) -> set[str]:
    """The settings ``env_file`` sets (none when there is no such file).

    Other names in it are left to whoever else reads the file, and logged once, so a
    misspelt setting does not pass unnoticed.
    """
    if env_file is None or not Path(env_file).is_file():
        return set()
    from dotenv import dotenv_values

    names = {name for name, value in dotenv_values(env_file).items() if value is not None}
    others = sorted(names - set(Settings.model_fields))
    if others:
        logger.warning("%s: not settings, ignored here: %s", env_file, ", ".join(others))
    return names & set(Settings.model_fields)
