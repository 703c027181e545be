"""Golden answers: what a bundle's cases are, how their inputs are made, and how a set of engines
scores against them.

A bundle converted by this rksmolvlm carries ``goldens/``: ``cases.json`` (each case's messages,
the prompt ids and the greedy token ids the original checkpoint generated in float32 with
transformers, and which tiles have reference tower features), ``features.npz`` (those features,
float16) and ``inputs/`` (the images and clip the cases show). ``open_verify_runner`` opens the
runtime's own Runner on the chosen engines (``rksmolvlm.runners``), ``verify_bundle`` runs every case
through it and compares. numpy only until an engine is opened: this runs on the board.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from rksmolvlm.bundle.goldens import (CASES_FILE, FEATURES_FILE, GOLDENS_DIR, GOLDENS_FORMAT, INPUTS_DIR, GoldenCase,
                                      Goldens, load_goldens)
from rksmolvlm.processing.content import ImagePart, VideoPart, media_parts

if TYPE_CHECKING:
    from rksmolvlm.runtime.engines import EngineOptions, VisionEncoder
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner

__all__ = ["GOLDENS_DIR", "CASES_FILE", "FEATURES_FILE", "INPUTS_DIR", "GOLDENS_FORMAT", "GoldenCase", "Goldens",
           "CaseResult", "VerifyResult", "case_media", "cut_at_stop", "verify_bundle", "load_goldens",
           "open_verify_runner", "DEFAULT_MIN_COSINE", "default_min_agreement"]

DEFAULT_MIN_COSINE = 0.99
_MIN_AGREEMENT = {"host": 1.0, "npu": 0.5, "sim": 0.5}


def default_min_agreement(engine: str) -> float:
    """host engines compute what transformers computes: all tokens must agree; board/simulated
    engines quantize, so half the tokens before the first divergence is the default floor."""
    return _MIN_AGREEMENT.get(engine, 0.5)


def case_media(messages: list, image_settings, video_settings) -> tuple[list[np.ndarray], list[Any], list[str]]:
    """Per media part of ``messages``: its uint8 tiles (images, split by the settings) or frames (videos,
    sampled at the part's fps/max_frames bounded by the checkpoint's), its layout for the assembler,
    and its kind ("image" | "video") — the runtime's processing, as its Runner does it."""
    from rksmolvlm.processing.assembler import Layout, VideoLayout
    from rksmolvlm.processing.image import preprocess

    pixels, layouts, kinds = [], [], []
    for part in media_parts(messages):
        if isinstance(part, ImagePart):
            tiled = preprocess(part.source, image_settings)
            pixels.append(tiled.tiles)
            layouts.append(Layout(tiled.rows, tiled.cols))
            kinds.append("image")
        elif isinstance(part, VideoPart):
            from rksmolvlm.processing.video import probe_video, read_frames
            from rksmolvlm.processing.video_frames import frame_timestamps, resize_frames, sample_indices

            s = video_settings
            fps = part.fps or s.fps
            limit = min(part.max_frames or s.max_frames, s.max_frames)
            info = probe_video(part.source)
            indices = sample_indices(info.total_num_frames, info.duration, info.fps, fps, limit, s.skip_secs)
            pixels.append(resize_frames(read_frames(part.source, [int(i) for i in indices]), s))
            layouts.append(VideoLayout(tuple(float(t) for t in frame_timestamps(indices, info.fps)),
                                       float(info.duration)))
            kinds.append("video")
    return pixels, layouts, kinds


@dataclass
class CaseResult:
    name: str
    prompt_match: bool  # the runtime prefilled the ids transformers was fed
    tile_cosines: list[float]  # per reference tile: engine features vs the original tower
    reference_tokens: int
    generated_tokens: int
    first_divergence: int  # tokens equal before the first difference (= reference_tokens when none)
    agreement: float  # first_divergence / reference_tokens
    exact: bool
    reference_ids: list[int] = field(default_factory=list)
    generated_ids: list[int] = field(default_factory=list)

    @property
    def min_cosine(self) -> float | None:
        return min(self.tile_cosines) if self.tile_cosines else None


@dataclass
class VerifyResult:
    bundle: str
    engine: str
    reference: str
    min_agreement: float
    min_cosine: float
    cases: list[CaseResult]
    notes: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        """Mean token agreement over the cases."""
        return float(np.mean([c.agreement for c in self.cases])) if self.cases else 0.0

    @property
    def failures(self) -> list[str]:
        out = []
        for c in self.cases:
            if c.agreement < self.min_agreement:
                out.append(f"{c.name}: token agreement {c.agreement:.0%} below {self.min_agreement:.0%}")
            if c.min_cosine is not None and c.min_cosine < self.min_cosine:
                out.append(f"{c.name}: tower cosine {c.min_cosine:.5f} below {self.min_cosine}")
            if not c.prompt_match:
                out.append(f"{c.name}: the prompt ids differ from the ones the reference was fed")
        return out

    @property
    def passed(self) -> bool:
        return bool(self.cases) and not self.failures

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "engine": self.engine, "reference": self.reference,
                "verdict": "pass" if self.passed else "fail", "agreement": self.agreement,
                "min_agreement": self.min_agreement, "min_cosine": self.min_cosine,
                "failures": self.failures, "notes": self.notes,
                "cases": [{**asdict(c), "min_tile_cosine": c.min_cosine} for c in self.cases]}

    def summary(self) -> str:
        lines = [f"verify {self.bundle} on {self.engine} engines against {self.reference}"]
        lines += [f"note: {n}" for n in self.notes]
        for c in self.cases:
            cos = "-" if c.min_cosine is None else f"{c.min_cosine:.5f}"
            per_tile = ", ".join(f"{v:.5f}" for v in c.tile_cosines)
            lines.append(f"  {c.name:<12} tower cosine {cos:<8}{f' ({per_tile})' if per_tile else ''}  "
                         f"tokens {c.first_divergence}/{c.reference_tokens} before the first divergence, "
                         f"agreement {c.agreement:.0%}, exact {'yes' if c.exact else 'no'}"
                         f"{'' if c.prompt_match else ', PROMPT DIFFERS'}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"verdict: {verdict} (mean agreement {self.agreement:.0%}; floors: agreement "
                     f"{self.min_agreement:.0%} per case, tower cosine {self.min_cosine})")
        lines += [f"  {f}" for f in self.failures]
        return "\n".join(lines)


def open_verify_runner(bundle: "RuntimeBundle", engine: str, options: "EngineOptions | None" = None,
                       work: Path | None = None) -> "Runner":
    """The Runner the goldens are replayed on: ``engine``'s engines (``rksmolvlm.runners``) with no
    image-feature cache, so every case runs the tower; ``sim`` builds the simulated tower in ``work``
    for every tile of the goldens' cases."""
    from rksmolvlm.runners import Simulation, open_runner, resolve_engine

    simulation = None
    if resolve_engine(engine) == "sim":
        if work is None:
            raise ValueError("the sim engine builds its tower in a work directory: pass work")
        simulation = Simulation(_golden_tiles(bundle), work)
    return open_runner(bundle, engine, options, simulation=simulation, image_cache_size=0)


def verify_bundle(runner: "Runner", engine: str, min_agreement: float | None = None,
                  min_cosine: float = DEFAULT_MIN_COSINE, notes: list[str] | None = None,
                  progress: Callable[[str], None] | None = None) -> VerifyResult:
    """Run every golden case of the runner's bundle through ``runner`` (``open_verify_runner``), its
    vision engine alone for the tower cosines; ``engine`` names the engines in the result."""
    from rksmolvlm.runtime.engines import GenerationConfig

    bundle = runner.bundle
    goldens = load_goldens(bundle)
    floor = default_min_agreement(engine) if min_agreement is None else min_agreement
    stops = set(bundle.stop_ids)
    results = []
    for case in goldens.cases:
        if progress:
            progress(case.name)
        messages = goldens.messages(case)
        cosines = []
        if case.feature_tiles:
            pixels, _, kinds = case_media(messages, bundle.settings, bundle.video_settings)
            cosines = _tile_cosines(runner.vision, pixels, kinds, case.feature_tiles, goldens.features[case.name])
        runner.llm.clear_history()
        result = runner.generate(messages, GenerationConfig(max_new_tokens=goldens.new_tokens)).consume()
        got = cut_at_stop(list(result.token_ids), stops)
        want = case.token_ids
        same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        results.append(CaseResult(case.name, list(result.prefill_ids) == case.prompt_ids, cosines, len(want),
                                  len(got), same, same / len(want) if want else 1.0, got == want, want, got))
    return VerifyResult(str(bundle.path), engine, goldens.reference, floor, min_cosine, results, list(notes or []))


def cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    """Ids up to and including the first end id."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1]
    return ids


def _tile_cosines(vision: "VisionEncoder", pixels: list[np.ndarray], kinds: list[str], wanted: list[int],
                  reference: np.ndarray) -> list[float]:
    """Cosine of the engine's features vs the reference for the tiles ``wanted`` (indices over all
    tiles/frames of the case, media order)."""
    owner = [(m, k) for m, tiles in enumerate(pixels) for k in range(len(tiles))]
    out = []
    for index, ref in zip(wanted, reference):
        m, k = owner[index]
        tile = pixels[m][k:k + 1]
        encode = vision.encode_frames if kinds[m] == "video" else vision.encode
        got = np.asarray(encode(tile), dtype=np.float64).ravel()
        ref = np.asarray(ref, dtype=np.float64).ravel()
        out.append(float(got @ ref / max(np.linalg.norm(got) * np.linalg.norm(ref), 1e-30)))
    return out


def _golden_tiles(bundle: "RuntimeBundle") -> np.ndarray:
    """Every tile and frame the goldens' cases show (what the simulated tower must be given at start)."""
    goldens = load_goldens(bundle)
    tiles = [p for case in goldens.cases
             for p in case_media(goldens.messages(case), bundle.settings, bundle.video_settings)[0]]
    size = bundle.settings.tile_size
    return np.concatenate(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8)
