"""The base of every config section: strict keys, numbers and flags written as such, read-only once loaded."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _kind_problem(annotation, value) -> str | None:
    """Why `value` is the wrong kind for a number or flag field (pydantic alone would take `true` as
    1, or 1 as true): None when it is fine or the field is not a plain number or flag."""
    if annotation in (int, float) and isinstance(value, bool):
        return f"expected a number, got {value!r}"
    if annotation is bool and not isinstance(value, bool):
        return f"expected true or false, got {value!r}"
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) in (list, tuple) and isinstance(value, (list, tuple)):
        for item in value:
            for arg in args:
                problem = _kind_problem(arg, item)
                if problem:
                    return problem
    return None


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are an error, a number or flag must be written as
    one (no `true` for a batch size, no `1` for a flag), and a loaded config is read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _same_kind(cls, value, info: ValidationInfo):
        problem = _kind_problem(cls.model_fields[info.field_name].annotation, value)
        if problem:
            raise ValueError(problem)
        return value
