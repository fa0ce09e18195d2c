"""Settings of ``q8chat serve``: each is a CLI flag (``--max-queue``) and a ``Q8CHAT_*`` environment
variable (``Q8CHAT_MAX_QUEUE``); the defaults live here and nowhere else, but for the quantization recipe's,
which ``q8chat quantize`` shares (``quant.defaults``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quant import defaults


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="Q8CHAT_", cli_kebab_case=True, cli_prog_name="q8chat serve", cli_implicit_flags=True, extra="ignore"
    )

    model: str = Field(
        "default", description="INT8 checkpoint dir, HF model dir, .gguf file, 'default', or random:SHAPE"
    )
    served_model_name: str | None = Field(None, description="name clients must send as 'model' (default: the model's)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    template: str = Field(
        "auto",
        description="chat template: auto (the model's own, else vicuna for Llama, chatml for MPT), vicuna, chatml, "
        "or a template file",
    )
    max_queue: int = Field(8, ge=0, description="requests that may wait while --max-batch generate; more get 429")
    max_batch: int = Field(
        1,
        ge=1,
        le=64,
        description="generations decoded together in one step, each with its own KV cache region (the "
        "compiled batched step of Llama and MPT; others decode them one after another); raise it for "
        "concurrent users: each slot costs a KV cache",
    )
    prefill_chunk: int = Field(
        512,
        ge=1,
        description="prompt tokens prefilled per step while other generations are decoding (a prompt's last "
        "chunk takes a rest of up to an eighth more)",
    )
    context_length: int | None = Field(None, ge=2, description="token limit of prompt + completion (default: model's)")
    kv_cache_dtype: Literal["auto", "bf16", "fp32", "int8"] = Field(
        "auto",
        description="element type of the static KV cache (Llama and MPT): bf16 takes half the memory and half "
        "the bytes a decode step reads from it; fp32 computes attention as the float model does; int8 (a "
        "scale a key or value) takes about half of bf16's; auto: int8 for --max-batch above 1 where the "
        "compiled kernels read it as stored (AVX-512 without AMX), bf16 otherwise",
    )
    kv_cache_mb: float = Field(
        256.0,
        ge=0,
        description="KV caches of past conversations kept for users who take turns (least recently used go "
        "first); 0 keeps only the last request's",
    )
    default_max_tokens: int = Field(512, ge=1, description="completion limit when a request sets none")
    alpha: Literal["auto"] | Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        "auto", description="SmoothQuant alpha when quantizing at start-up: 'auto' (per-layer search) or in [0, 1]"
    )
    scheme: Literal["dynamic", "static"] = Field("dynamic", description="INT8 activation scheme when quantizing")
    calib_samples: int = Field(defaults.CALIB_SAMPLES, ge=1, description="calibration sequences when quantizing")
    cache_dir: Path = Field(
        default=defaults.CACHE_DIR, description="where quantized checkpoints and compiled kernels are cached"
    )
    compile: bool = Field(
        True,
        description="compile the prefill and decode steps (Llama and MPT; about 2.5 "
        "minutes on 2 cores at the first start, then loaded from the cache "
        "dir in seconds); --no-compile runs them eagerly, slower",
    )
    int8_kernel: Literal["auto", "s8s8", "u8s8", "bf16"] = Field(
        "auto",
        description="W8A8 kernel of the compiled steps: auto (by the CPU: s8s8 with AMX; u8s8 prefill and "
        "bf16 decode with VNNI; s8s8 on AVX2 alone, else bf16), or one of them for both steps, to compare",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest accepted request body (413 above)")
    body_timeout_s: float = Field(10.0, gt=0, description="longest wait for the next part of a request body (408)")
    keepalive_s: float = Field(10.0, gt=0, description="SSE keep-alive comment interval while no token comes")
    socket: int = Field(0, ge=0, description="CPU socket to pin to")
    threads: int | None = Field(None, ge=1, description="compute threads (default: the socket's physical cores)")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted API keys: repeat the flag, or Q8CHAT_API_KEY=key1,key2"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS (default: none), comma-separated in the env"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log line format")
    shutdown_grace_s: float = Field(30.0, gt=0, description="on SIGTERM, how long the running generation may finish")

    @field_validator("api_key", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @classmethod
    def from_args(cls, argv: list[str]) -> "Settings":
        return cls(_cli_parse_args=argv)
