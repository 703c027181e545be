"""rknn-toolkit2 (the real one) builds the tower fp16 and int8; the simulator agrees with torch;
every op stays on the NPU at the three published tower geometries."""

import numpy as np
import pytest
import torch

from rksmolvlm.boards import load_profile
from rksmolvlm.convert.metrics import cosine
from rksmolvlm.convert.vision_rknn import build_vision_rknn, parse_layer_table
from rksmolvlm.convert.vision_tower import VisionTower, export_onnx, torch_features
from rksmolvlm.errors import TargetError
from rksmolvlm.processing.image import ImageSettings, normalize


def _tower(vision_hidden, patch, tile, scale, text_hidden, heads):
    """A one-layer tower at real published dimensions (random weights)."""
    import transformers as tf

    config = tf.Idefics3Config(
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4, num_hidden_layers=1,
                           num_attention_heads=heads, image_size=tile, patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=text_hidden, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1),
        scale_factor=scale, image_token_id=63)
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tf.Idefics3ForConditionalGeneration(config).eval()
    return VisionTower(model.model, scale).eval()


class StockConnector(torch.nn.Module):
    """Pixel shuffle + Linear as transformers writes it (the layout that falls back to the CPU)."""

    def __init__(self, tower: VisionTower, linear: torch.nn.Linear):
        super().__init__()
        self.tower, self.linear = tower, linear

    def forward(self, x):
        t = self.tower
        h = t.patch_embedding(x).flatten(2).transpose(1, 2) + t.position_embedding
        n, seq, d = h.shape
        s, g = t.scale, t.grid
        h = h.reshape(n, g, g // s, d * s).permute(0, 2, 1, 3).reshape(n, g // s, g // s, d * s * s)
        h = h.permute(0, 2, 1, 3).reshape(n, seq // (s * s), d * s * s)
        return self.linear(h)


@pytest.mark.slow  # rknn-toolkit2 builds a real-size tower
@pytest.mark.parametrize("geometry", [
    pytest.param((768, 16, 512, 4, 576, 12), id="256M"),
    pytest.param((768, 16, 512, 4, 960, 12), id="500M"),
    pytest.param((1152, 14, 384, 3, 2048, 16), id="2.2B"),
])
def test_real_geometry_keeps_every_op_on_the_npu(geometry, tmp_path):
    tower = _tower(*geometry)
    tile = geometry[2]
    export_onnx(tower, tmp_path / "v.onnx", tile)
    tiles = np.random.RandomState(0).randint(0, 256, (1, tile, tile, 3), dtype=np.uint8)
    build = build_vision_rknn(tmp_path / "v.onnx", tmp_path / "v.rknn", load_profile("rk3588"), "fp16",
                              tmp_path / "log", evaluation_tiles=tiles)
    assert build.layers, "the compiler's layer table was not found in its output"
    assert build.cpu_fallback == []
    settings = ImageSettings(tile_size=tile, longest_edge=4 * tile)
    reference = torch_features(tower, normalize(tiles, settings))
    assert cosine(build.simulated.reshape(reference.shape), reference) > 0.999


@pytest.mark.slow  # rknn-toolkit2 builds a real-size tower
def test_stock_pixel_shuffle_falls_back_and_is_reported(tmp_path):
    tower = _tower(1152, 14, 384, 3, 2048, 16)
    linear = torch.nn.Linear(1152 * 9, 2048, bias=False)
    export_onnx(StockConnector(tower, linear).eval(), tmp_path / "stock.onnx", 378)
    build = build_vision_rknn(tmp_path / "stock.onnx", tmp_path / "stock.rknn", load_profile("rk3588"), "fp16",
                              tmp_path / "log")
    assert [layer.op for layer in build.cpu_fallback] == ["Transpose"]


def test_parse_layer_table_reads_targets_and_cycles(tmp_path):
    d = "D RKNN: [10:00:00.000] "  # the compiler's debug-line prefix
    log = "\n".join([
        "I something before",
        d + "-" * 40,
        d + "     Network Layer Information Table",
        d + "-" * 40,
        d + "ID   OpType    DataType Target InputShape   OutputShape   Cycles(DDR/NPU/Total)  RW(KB)  FullName",
        d + "-" * 40,
        d + "0    InputOperator  FLOAT16  CPU    \\     (1,3,8,8)     0/0/0   0   InputOperator:x",
        d + "1    Conv      FLOAT16  NPU    (1,3,8,8),(4,3,1,1)   (1,4,8,8)   10/20/30   1   Conv:/c",
        d + "2    Transpose FLOAT16  CPU    (1,4,8,8)   (1,8,8,4)   0/0/0   2   Transpose:/t",
        d + "3    OutputOperator FLOAT16 CPU  (1,8,8,4)   \\   0/0/0   0   OutputOperator:y",
        d + "-" * 40,
        d + "9    Conv  FLOAT16  CPU   a   b   1/1/1   1   Conv:/not-in-table",
    ])
    layers = parse_layer_table(log)
    assert [(layer.index, layer.op, layer.target) for layer in layers] == [
        (0, "InputOperator", "CPU"), (1, "Conv", "NPU"), (2, "Transpose", "CPU"), (3, "OutputOperator", "CPU")]
    assert layers[1].cycles == 30 and layers[2].name == "Transpose:/t"


def test_int8_needs_a_dataset_and_a_valid_dtype(tmp_path):
    with pytest.raises(TargetError, match="calibration dataset"):
        build_vision_rknn(tmp_path / "x.onnx", tmp_path / "x.rknn", load_profile("rk3588"), "int8", tmp_path / "l")
    with pytest.raises(TargetError, match="fp16, int8"):
        build_vision_rknn(tmp_path / "x.onnx", tmp_path / "x.rknn", load_profile("rk3588"), "int4", tmp_path / "l")
