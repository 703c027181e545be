"""The fixed-resolution tower + folded connector equals transformers' get_image_features, and
its ONNX export equals torch in onnxruntime."""

import numpy as np
import pytest
import torch

from rksmolvlm.convert.source import open_checkpoint
from rksmolvlm.convert.vision_tower import check_onnx, export_onnx, load_vision_tower, torch_features


@pytest.fixture(scope="module")
def towers(tiny_checkpoints):
    return {name: (open_checkpoint(str(p)),) + load_vision_tower(open_checkpoint(str(p)))
            for name, p in tiny_checkpoints.items()}


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b", "smolvlm2"])
def test_wrapper_equals_get_image_features(towers, name):
    ck, tower, model = towers[name]
    t = ck.vision.tile_size
    pixels = torch.randn(1, 3, 3, t, t, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model.model.get_image_features(pixel_values=pixels).pooler_output[0]
    ours = torch_features(tower, pixels[0].numpy())
    assert ours.shape == (3, ck.vision.image_seq_len, ck.text.hidden_size)
    np.testing.assert_allclose(ours.reshape(reference.shape), reference.numpy(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b", "smolvlm2"])
def test_onnx_matches_torch(towers, name, tmp_path):
    ck, tower, _ = towers[name]
    t = ck.vision.tile_size
    path = tmp_path / "vision.onnx"
    export_onnx(tower, path, t)
    import onnx

    model = onnx.load(str(path))
    assert model.opset_import[0].version <= 19
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, t, t]
    tiles = np.random.RandomState(2).uniform(-1, 1, (4, 3, t, t)).astype(np.float32)
    result = check_onnx(path, tiles, torch_features(tower, tiles))
    assert result.tiles == 4
    assert result.max_abs <= 1e-4
    assert result.cosine > 0.999999
