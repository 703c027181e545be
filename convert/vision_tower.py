"""The SigLIP tower + connector as a fixed-resolution module, exported to ONNX.

The stock vision wrapper computes position ids from a patch mask with bucketize on floats, which
breaks in onnxruntime; with full T×T tiles every patch is valid, so position ids are 0..N−1 and
the position table is added directly. Pixel shuffle + the bias-free projection are folded into
one strided Conv2d (exact), which keeps the connector on the NPU at every geometry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rksmolvlm.convert.source import Checkpoint

__all__ = ["VisionTower", "load_vision_tower", "export_onnx", "OnnxCheck", "check_onnx", "torch_features",
           "onnx_session", "onnx_features", "onnx_matches", "ONNX_MATCH_COSINE"]

ONNX_OPSET = 17  # rknn-toolkit2 accepts opsets up to 19; torch 2.13's legacy exporter defaults to 20
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
# onnxruntime stands in for torch (the decoder calibration's image features) only at or above this
# cosine on the held-out tiles; float32 exports score ≥ 0.9999999 (a different summation order only)
ONNX_MATCH_COSINE = 0.99999


def _torch():
    import torch

    return torch


class VisionTower(_torch().nn.Module):
    """(N, 3, T, T) normalized float tiles → (N, image_seq_len, text_hidden) image features."""

    def __init__(self, vlm_model, scale_factor: int):
        super().__init__()
        torch = _torch()
        vision = vlm_model.vision_model
        self.patch_embedding = vision.embeddings.patch_embedding
        self.encoder = vision.encoder
        self.post_layernorm = vision.post_layernorm
        self.register_buffer("position_embedding",
                             vision.embeddings.position_embedding.weight.detach().clone().unsqueeze(0))
        self.grid = vision.embeddings.num_patches_per_side
        self.scale = scale_factor
        linear = vlm_model.connector.modality_projection.proj
        width = vision.config.hidden_size
        out_features = linear.out_features
        s = scale_factor
        # W_conv[o, c, dy, dx] = W_lin[o, (dy*s + dx)*D + c]
        weight = linear.weight.detach().reshape(out_features, s, s, width).permute(0, 3, 1, 2).contiguous()
        self.connector = torch.nn.Conv2d(width, out_features, kernel_size=s, stride=s, bias=False)
        with torch.no_grad():
            self.connector.weight.copy_(weight)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = x + self.position_embedding
        x = self.encoder(inputs_embeds=x, attention_mask=None)
        x = x.last_hidden_state if hasattr(x, "last_hidden_state") else x[0]
        x = self.post_layernorm(x)
        n, _, width = x.shape
        x = x.transpose(1, 2).reshape(n, width, self.grid, self.grid)
        return self.connector(x).flatten(2).transpose(1, 2)


def load_vision_tower(checkpoint: Checkpoint) -> tuple[VisionTower, object]:
    """Load the checkpoint's VLM in float32 with eager attention; return (tower, full model)."""
    import transformers as tf

    tf.utils.logging.disable_progress_bar()
    tf.utils.logging.set_verbosity_error()
    cls = tf.Idefics3ForConditionalGeneration if checkpoint.family == "idefics3" else \
        tf.SmolVLMForConditionalGeneration
    model = cls.from_pretrained(str(checkpoint.path), dtype=_torch().float32, attn_implementation="eager")
    model.eval()
    tower = VisionTower(model.model, checkpoint.vision.scale_factor).eval()
    return tower, model


def torch_features(tower: VisionTower, tiles: np.ndarray, batch: int = 4) -> np.ndarray:
    """Run the torch tower on normalized float tiles (N, 3, T, T) in small batches."""
    torch = _torch()
    out = []
    with torch.no_grad():
        for i in range(0, len(tiles), batch):
            out.append(tower(torch.from_numpy(np.ascontiguousarray(tiles[i:i + batch]))).numpy())
    return np.concatenate(out, axis=0)


def export_onnx(tower: VisionTower, path: Path, tile_size: int, batch: int = 1) -> float:
    """Export with a fixed (batch, 3, T, T) input; return the seconds it took."""
    import contextlib
    import io
    import warnings

    torch = _torch()
    start = time.perf_counter()
    dummy = torch.zeros(batch, 3, tile_size, tile_size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(tower, (dummy,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True)
    return time.perf_counter() - start


@dataclass
class OnnxCheck:
    """ONNX (onnxruntime) against torch on the same tiles."""

    tiles: int
    max_abs: float
    cosine: float


def onnx_session(onnx_path: Path, threads: int | None = None):
    """An onnxruntime CPU session on ``onnx_path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_features(session, tiles: np.ndarray) -> np.ndarray:
    """Run the exported tower on normalized float tiles (N, 3, T, T), in its fixed batch size."""
    batch = int(session.get_inputs()[0].shape[0])
    tiles = np.ascontiguousarray(tiles, dtype=np.float32)
    got = [session.run(None, {INPUT_NAME: tiles[i:i + batch]})[0] for i in range(0, len(tiles), batch)]
    return np.concatenate(got, axis=0).astype(np.float32, copy=False)


def check_onnx(onnx_path: Path, tiles: np.ndarray, reference: np.ndarray) -> OnnxCheck:
    """Compare onnxruntime with the torch ``reference`` features of ``tiles``, tile by tile (the
    ONNX input is fixed to one batch size)."""
    from rksmolvlm.convert.metrics import cosine, max_abs

    got = onnx_features(onnx_session(onnx_path), tiles)
    return OnnxCheck(tiles=len(tiles), max_abs=max_abs(got, reference), cosine=cosine(got, reference))


def onnx_matches(check: OnnxCheck) -> bool:
    """Whether onnxruntime may stand in for torch: the check ran on tiles and scored ≥ ONNX_MATCH_COSINE."""
    return check.tiles > 0 and check.cosine >= ONNX_MATCH_COSINE
