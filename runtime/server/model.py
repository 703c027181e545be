"""The served model as the API describes it: the id clients name, its aliases and the bundle's facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported for `rksmolvlm --help`: the loader's numpy loads on use
    from rksmolvlm.runtime.loader import RuntimeBundle

__all__ = ["ServedModel"]


@dataclass(frozen=True)
class ServedModel:
    """What the server says about its model: the id clients name, and the bundle's facts."""

    id: str
    aliases: tuple[str, ...]
    max_context: int
    created: int
    engine: str
    details: dict = field(default_factory=dict)
    video: dict | None = None  # the checkpoint's video sampling (fps, max_frames, …); None: the model takes no video

    @classmethod
    def from_bundle(cls, bundle: RuntimeBundle, name: str | None, engine: str) -> "ServedModel":
        from rksmolvlm.bundle.manifest import MANIFEST

        manifest = bundle.manifest
        source = manifest.source.model_id or bundle.path.name
        created = int(bundle.path.joinpath(MANIFEST).stat().st_mtime)
        details = {"family": manifest.model.family, "size": manifest.model.size,
                   "target": manifest.target.platform,
                   "vision_dtype": manifest.vision.dtype if manifest.vision else None,
                   "llm_dtype": manifest.llm.dtype if manifest.llm else None,
                   "max_context": bundle.max_context, "engine": engine}
        ident = name or source
        aliases = tuple(dict.fromkeys(a for a in (source, bundle.path.name) if a != ident))
        video = manifest.video.settings if manifest.video is not None else None
        sampling = None if video is None else {"fps": video.fps, "max_frames": video.max_frames,
                                               "skip_secs": video.skip_secs, "frame_size": video.frame_size}
        return cls(ident, aliases, bundle.max_context, created, engine, details, sampling)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)
