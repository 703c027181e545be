"""The shipped calibration set is licensed file by file, and the builder makes tower inputs with
the runtime's own preprocessing, NCHW uint8, with held-out images kept apart."""

import re

import numpy as np
import pytest
from PIL import Image

from rksmolvlm.calibration.vision_set import (build_tile_sets, collect_images, shipped_images_dir,
                                              write_rknn_dataset)
from rksmolvlm.errors import CalibrationError
from rksmolvlm.processing.image import ImageSettings, preprocess

SETTINGS = ImageSettings(tile_size=64, longest_edge=256)


def test_shipped_set_is_licensed_file_by_file():
    images = collect_images(shipped_images_dir())
    licenses = (shipped_images_dir().parent / "LICENSES.md").read_text()
    assert len(images) >= 20
    for path in images:
        assert path.name in licenses, f"{path.name} has no license entry"
    listed = set(re.findall(r"\b([a-z0-9_]+\.(?:png|jpg|jpeg))\b", licenses))
    shipped = {p.name for p in images}
    assert {name for name in listed if name.split("_")[0] in {"photo", "doc", "chart", "screen", "scene",
                                                               "diagram"}} <= shipped


def test_shipped_set_mixes_the_content_kinds():
    kinds = {p.name.split("_")[0] for p in collect_images(shipped_images_dir())}
    assert {"photo", "doc", "chart", "screen", "scene", "diagram"} <= kinds


def test_tiles_are_the_runtime_tiles_and_holdout_is_disjoint(calibration_dir):
    images = collect_images(calibration_dir)
    sets = build_tile_sets(images, SETTINGS, calibration_tiles=10, evaluation_tiles=3)
    assert set(sets.calibration_images).isdisjoint(sets.evaluation_images)
    assert len(sets.calibration_images) + len(sets.evaluation_images) == len(images)
    assert sets.calibration.shape == (10, 64, 64, 3) and sets.calibration.dtype == np.uint8
    assert sets.evaluation.shape == (3, 64, 64, 3)
    runtime_tiles = np.concatenate([preprocess(calibration_dir / n, SETTINGS).tiles
                                    for n in sets.calibration_images])
    for tile in sets.calibration:
        assert any(np.array_equal(tile, t) for t in runtime_tiles)
    globals_ = [preprocess(calibration_dir / n, SETTINGS).tiles[-1] for n in sets.calibration_images]
    for g in globals_:  # every calibration image contributes its global view
        assert any(np.array_equal(g, t) for t in sets.calibration)


def test_rknn_dataset_files_are_nchw_uint8(calibration_dir, tmp_path):
    sets = build_tile_sets(collect_images(calibration_dir), SETTINGS, calibration_tiles=4, evaluation_tiles=1)
    listing = write_rknn_dataset(sets.calibration, tmp_path / "ds")
    paths = listing.read_text().split()
    assert len(paths) == 4
    for path, tile in zip(paths, sets.calibration):
        arr = np.load(path)
        assert arr.dtype == np.uint8 and arr.shape == (1, 3, 64, 64)
        assert np.array_equal(arr[0].transpose(1, 2, 0), tile)


def test_unreadable_image_is_named(calibration_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in collect_images(calibration_dir)[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CalibrationError, match="broken.jpg cannot be used"):
        build_tile_sets(collect_images(folder), SETTINGS)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        collect_images(tmp_path / "nope")
    with pytest.raises(CalibrationError, match="holds no images"):
        collect_images(tmp_path)


def test_needs_two_images(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "one.png")
    with pytest.raises(CalibrationError, match="at least 2 images"):
        build_tile_sets(collect_images(tmp_path), SETTINGS)
