"""Open a bundle for inference and pick its engines. Reads nothing but the bundle: the manifest is
the whole contract."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rksmolvlm.bundle import read_manifest
from rksmolvlm.errors import BundleError
from rksmolvlm.runtime.embed import EmbeddingTable
from rksmolvlm.runtime.preprocess import ImageSettings
from rksmolvlm.runtime.prompt import PromptBuilder, PromptTokens

__all__ = ["RuntimeBundle", "on_rockchip_board", "ENGINES"]

ENGINES = ("auto", "host", "npu")


def on_rockchip_board(root: str = "/") -> bool:
    """True on a Rockchip SoC (device tree compatible string names rockchip)."""
    path = Path(root) / "proc/device-tree/compatible"
    try:
        return b"rockchip," in path.read_bytes()
    except OSError:
        return False


@dataclass
class RuntimeBundle:
    path: Path
    manifest: dict
    settings: ImageSettings
    prompts: PromptBuilder
    image_id: int
    stop_ids: tuple[int, ...]
    max_context: int

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "RuntimeBundle":
        root = Path(path).expanduser()
        manifest = read_manifest(root, verify=verify)
        if manifest.get("llm") is None or manifest["llm"].get("embed_tokens") is None:
            raise BundleError(f"{root} has no decoder part: convert with --parts vision,llm")
        if manifest.get("vision") is None:
            raise BundleError(f"{root} has no vision part: convert with --parts vision,llm")
        settings = ImageSettings.from_dict(manifest["processor"])
        prompts = PromptBuilder(root / manifest["tokenizer"], manifest["chat_template"],
                                PromptTokens.from_manifest(manifest))
        tokens = manifest["tokens"]
        return cls(root, manifest, settings, prompts, int(tokens["image_id"]),
                   tuple(int(i) for i in tokens["eos_ids"]), int(manifest["llm"]["max_context"]))

    def file(self, name: str) -> Path:
        return self.path / name

    def embedding_table(self) -> EmbeddingTable:
        return EmbeddingTable(self.file(self.manifest["llm"]["embed_tokens"]["file"]))

    def make_engines(self, engine: str = "auto", threads: int | None = None, library: str | None = None,
                     cores: list[int] | None = None, config=None):
        """(vision encoder, LLM engine) for ``engine``: host (onnxruntime + torch), npu (RKNNLite +
        librkllmrt), or auto (npu on a Rockchip board, host elsewhere)."""
        if engine not in ENGINES:
            raise BundleError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
        if engine == "auto":
            engine = "npu" if on_rockchip_board() else "host"
        if engine == "npu":
            from rksmolvlm.runtime.npu_engines import make_npu_engines

            return make_npu_engines(self, library=library, cores=cores, config=config)
        from rksmolvlm.runtime.host_engines import OnnxVisionEncoder, TorchLlmEngine

        vision = self.manifest["vision"]
        llm = self.manifest["llm"]
        if not vision.get("onnx") or not llm.get("decoder_dir"):
            raise BundleError(f"{self.path} has no host-preview files (vision.onnx, decoder/): convert with "
                              "--host-preview, or run on the board with --engine npu")
        return (OnnxVisionEncoder(self.file(vision["onnx"]), self.settings, threads),
                TorchLlmEngine(self.file(llm["decoder_dir"]), threads))
