"""The goldens' format: the golden answers a bundle carries in ``goldens/``, written by the converter
(``rksmolvlm.convert.goldens``) and read by ``rksmolvlm verify`` (``rksmolvlm.tools.verify``).

``cases.json`` holds each case's messages (media by file name under ``inputs/``), the prompt ids and
the greedy token ids the original checkpoint generated, and which of its tiles have reference tower
features; ``features.npz`` holds those features (float16, one array per case); ``inputs/`` the images
and clips the cases show. The manifest's ``goldens`` part (``GoldensInfo``) names the two files.
numpy only: this runs on the board.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rksmolvlm.bundle.manifest import GoldensInfo, Manifest
from rksmolvlm.errors import BundleError
from rksmolvlm.processing.content import conversation

__all__ = ["GOLDENS_DIR", "CASES_FILE", "FEATURES_FILE", "INPUTS_DIR", "GOLDENS_FORMAT", "NO_GOLDENS", "GoldenCase",
           "Goldens", "load_goldens"]

GOLDENS_DIR = "goldens"
CASES_FILE, FEATURES_FILE, INPUTS_DIR = "cases.json", "features.npz", "inputs"
GOLDENS_FORMAT = 1
NO_GOLDENS = ("{root} has no golden answers (goldens/ in manifest.json): it was converted with --no-goldens, "
              "with only one part, or by an older rksmolvlm; convert the checkpoint again with "
              "'rksmolvlm convert MODEL -o BUNDLE' (both parts, without --no-goldens) to record them")


@dataclass(frozen=True)
class GoldenCase:
    name: str
    messages: list[dict]  # chat messages; media sources are file names under goldens/inputs/
    prompt_ids: list[int]
    token_ids: list[int]  # transformers' greedy ids, cut after the first end id
    feature_tiles: list[int]  # indices into the case's tiles/frames (media order) with reference features
    tiles: int | None = None  # tiles and frames of the case's media, all told

    def to_dict(self) -> dict:
        return {"name": self.name, "messages": self.messages, "prompt_ids": list(self.prompt_ids),
                "token_ids": list(self.token_ids), "feature_tiles": list(self.feature_tiles), "tiles": self.tiles}

    @classmethod
    def from_dict(cls, data: Any) -> "GoldenCase":
        """One case of ``cases.json``; a ValueError naming the key when it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"a case must be an object, not {type(data).__name__}")
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("a case has no 'name'")
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"case {name!r}: 'messages' must be a list of objects")
        tiles = data.get("tiles")
        if tiles is not None and not _ids(tiles, single=True):
            raise ValueError(f"case {name!r}: 'tiles' must be a non-negative integer")
        return cls(name, list(messages), _id_list(data, "prompt_ids", name), _id_list(data, "token_ids", name),
                   _id_list(data, "feature_tiles", name), tiles)


@dataclass(frozen=True)
class Goldens:
    root: Path  # the bundle
    new_tokens: int
    reference: str  # what generated the answers (model, dtype, library)
    cases: list[GoldenCase]
    features: dict[str, np.ndarray] = field(default_factory=dict)  # case name → (len(feature_tiles), seq, hidden)
    inputs: dict[str, str] = field(default_factory=dict)  # file name under goldens/inputs/ → sha256

    @classmethod
    def read(cls, root: Path, cases_file: Path, features_file: Path) -> "Goldens":
        try:
            data = json.loads(cases_file.read_text(encoding="utf-8"))
            with np.load(features_file, allow_pickle=False) as npz:
                features = {k: npz[k] for k in npz.files}
            return cls.from_dict(data, root, features)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{cases_file} cannot be read ({exc}): convert the bundle again") from exc

    def to_dict(self) -> dict:
        """``cases.json`` as written (the features go to ``features.npz``)."""
        return {"format": GOLDENS_FORMAT, "new_tokens": self.new_tokens, "reference": self.reference,
                "inputs": dict(self.inputs), "cases": [c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, data: Any, root: Path, features: dict[str, np.ndarray] | None = None) -> "Goldens":
        """``cases.json``'s content; a ValueError naming the key when it is not that."""
        if not isinstance(data, dict):
            raise ValueError("cases.json must hold an object")
        if data.get("format") != GOLDENS_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this rksmolvlm reads {GOLDENS_FORMAT}")
        new_tokens, reference, cases = data.get("new_tokens"), data.get("reference"), data.get("cases")
        if not isinstance(new_tokens, int) or isinstance(new_tokens, bool) or new_tokens < 1:
            raise ValueError(f"'new_tokens' must be an integer ≥ 1, not {new_tokens!r}")
        if not isinstance(reference, str):
            raise ValueError("'reference' must be a string")
        if not isinstance(cases, list):
            raise ValueError("'cases' must be a list")
        inputs = data.get("inputs", {})
        if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
            raise ValueError("'inputs' must map file names to sha256")
        return cls(Path(root), new_tokens, reference, [GoldenCase.from_dict(c) for c in cases], dict(features or {}),
                   dict(inputs))

    def write(self) -> GoldensInfo:
        """Write ``cases.json`` and ``features.npz`` into the bundle's ``goldens/`` (the inputs are
        copied there by the caller); return the manifest's part naming them."""
        folder = self.root / GOLDENS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CASES_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        np.savez_compressed(folder / FEATURES_FILE, **self.features)
        return GoldensInfo(f"{GOLDENS_DIR}/{CASES_FILE}", f"{GOLDENS_DIR}/{FEATURES_FILE}", self.new_tokens)

    def messages(self, case: GoldenCase) -> list:
        """The case's messages as typed records, media names resolved in goldens/inputs/."""
        inputs = self.root / GOLDENS_DIR / INPUTS_DIR

        def part(p):
            kind = p.get("type")
            if kind in ("image", "video") and isinstance(p.get(kind), str):
                return {**p, kind: str(inputs / p[kind])}
            return p

        return conversation([{**m, "content": [part(p) for p in m["content"]]} for m in case.messages])


class OpenedBundle(Protocol):
    """What the goldens need of an opened bundle (a RuntimeBundle)."""

    path: Path
    manifest: Manifest


def load_goldens(bundle: OpenedBundle) -> Goldens:
    """The goldens of an opened bundle; a BundleError naming the fix when it has none."""
    info = bundle.manifest.goldens
    if info is None:
        raise BundleError(NO_GOLDENS.format(root=bundle.path))
    return Goldens.read(Path(bundle.path), bundle.manifest.path(info.cases), bundle.manifest.path(info.features))


def _ids(value: Any, single: bool = False) -> bool:
    if single:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, list) and all(_ids(v, single=True) for v in value)


def _id_list(data: dict, key: str, name: str) -> list[int]:
    value = data.get(key)
    if not isinstance(value, list) or not _ids(value):
        raise ValueError(f"case {name!r}: {key!r} must be a list of non-negative integers")
    return list(value)
