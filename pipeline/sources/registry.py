"""Which sources exist and how one is chosen: the source name, its options, and the rules between them.

Kept apart from ``pipeline.sources.base`` so the protocol knows no implementation; each implementation
is imported only when it is built, so choosing ``synthetic`` never imports earthengine-api.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import SourceError, describe_validation

if TYPE_CHECKING:
    from pipeline.sources.base import Source


class SourceName(str, enum.Enum):
    synthetic = "synthetic"
    local = "local"
    earthengine = "earthengine"


SOURCE_NAMES = tuple(s.value for s in SourceName)


def root_problem(name: str, root: Any) -> str | None:
    """The local-root rule, written once: ``local`` needs a folder, the other sources take none."""
    if name == SourceName.local.value and root is None:
        return (
            "--source local needs --root DIR, the folder with your GeoTIFFs (in a flow: source_options {'root': DIR})"
        )
    if name != SourceName.local.value and root is not None:
        return f"--root only applies to --source local, not {name}; drop it (in a flow: drop source_options 'root')"
    return None


class SourceSpec(BaseModel):
    """Where pixels come from: the source name and its keyword arguments."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True, validate_default=True)

    name: SourceName = Field(
        SourceName.synthetic,
        description="synthetic (offline simulator with truth), local (a folder of GeoTIFFs) or earthengine.",
    )
    root: Path | None = Field(None, description="Folder of GeoTIFFs; required for local, refused for the others.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Other keyword arguments of the source, e.g. {'seed': 3} for synthetic, {'project': 'my-gcp-project'} for "
            "earthengine."
        ),
    )

    @model_validator(mode="after")
    def _root_rule(self) -> "SourceSpec":
        problem = root_problem(str(self.name), self.root)
        if problem:
            raise ValueError(problem)
        return self

    @classmethod
    def parse(
        cls, name: str | SourceName, root: Path | str | None = None, options: dict[str, Any] | None = None
    ) -> "SourceSpec":
        """A spec from CLI options or flow parameters (``options`` may carry ``root``).

        Invalid input raises one ``SourceError`` line.
        """
        options = dict(options or {})
        if root is None and "root" in options:
            root = options.pop("root")
        options.pop("root", None)
        name = name.value if isinstance(name, SourceName) else str(name)
        if name not in SOURCE_NAMES:
            raise SourceError(f"unknown source {name!r}; use {', '.join(SOURCE_NAMES)}")
        try:
            return cls(name=name, root=root, options=options)
        except ValidationError as exc:
            raise SourceError(describe_validation(exc, str, "source")) from None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the source's constructor."""
        return {**self.options, **({"root": self.root} if self.root is not None else {})}

    def build(self) -> Source:
        return get_source(str(self.name), **self.kwargs())


def get_source(name: str, **options: Any) -> Source:
    """Build a source by name: ``synthetic`` (default, offline), ``local`` (needs ``root=``), ``earthengine``."""
    if name == SourceName.synthetic.value:
        from pipeline.sources.synthetic.source import SyntheticSource

        return SyntheticSource(**options)
    if name == SourceName.local.value:
        from pipeline.sources.local.source import LocalSource

        return LocalSource(**options)
    if name == SourceName.earthengine.value:
        from pipeline.sources.earthengine.source import EarthEngineSource

        return EarthEngineSource(**options)
    raise SourceError(f"unknown source {name!r}; use {', '.join(SOURCE_NAMES)}")
