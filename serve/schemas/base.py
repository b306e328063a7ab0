"""The wire models' bases and conventions: request bodies (`_In`) forbid unknown fields and take
JSON types strictly; responses (`_Out`) are camelCase; timestamps are ISO 8601 UTC strings."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic.alias_generators import to_camel


def _takes_int(annotation: Any) -> bool:
    return annotation is int or (get_origin(annotation) is Union and int in get_args(annotation))


def iso(ts: float | None) -> str | None:
    """Epoch seconds → the wire's timestamp format (`2026-11-29T07:24:00.123Z`)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dump(model: Any) -> Any:
    """A wire model as its JSON value (camelCase)."""
    return model.model_dump(mode="json", by_alias=True)


class _In(BaseModel):
    # strict: JSON types are taken as declared ("7" is not an integer, true is not a number), so
    # the OpenAPI document says exactly what is accepted. Multipart form fields, which are all
    # text, are converted by `serve.api.forms.read_photo_sources` (`strict=False`).
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integral_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """JSON Schema's `integer` includes numbers with a zero fraction (7.0): take those as ints
        (strings and booleans still fail the strict check)."""
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 and info.field_name \
                and _takes_int(cls.model_fields[info.field_name].annotation):
            return int(value)
        return value


class _Out(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
