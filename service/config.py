"""Service settings: one pydantic-settings `Settings`, read from OODSERVE_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BUNDLE = Path("models/bundles/fashion-mnist")


def _split_list(value: Any) -> Any:
    """Accept a comma-separated string or a JSON list for list settings."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of the service; each field `x` is read from the environment variable OODSERVE_X."""

    model_config = SettingsConfigDict(env_prefix="OODSERVE_", extra="ignore")

    bundle: Path = Field(DEFAULT_BUNDLE, description="Directory of the default bundle (served as the default model).")
    extra_bundles: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="More bundle directories to serve by name (comma-separated)."
    )
    host: str = Field("127.0.0.1", description="Address `oodserve serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `oodserve serve` listens on.")
    providers: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="onnxruntime execution providers in order (comma-separated); default: CUDA first where available, then CPU.",
    )
    require_gpu: bool = Field(False, description="Refuse to start unless every session runs on CUDAExecutionProvider.")
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session (0 = onnxruntime's default).")
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads per session (0 = onnxruntime's default).")
    warmup_batch_size: int = Field(8, ge=1, description="Instances in the warm-up run done before readiness.")
    max_batch_instances: int = Field(256, ge=1, description="Most instances one score request may carry (else 413).")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body in bytes (else 413).")
    ood_rate_window: int = Field(1000, ge=1, description="Last verdicts per model that the oodserve_ood_rate gauge averages.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of the service.")

    @field_validator("extra_bundles", "providers", mode="before")
    @classmethod
    def _lists_from_text(cls, value: Any) -> Any:
        return _split_list(value)
