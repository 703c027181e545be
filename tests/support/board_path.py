"""The board path without torch, transformers, onnx, onnxruntime or rknn-toolkit2: run as
``python tests/support/board_path.py BUNDLE IMAGE`` by test_runner.py. Those imports are blocked before
anything else is imported; the bundle is opened, a conversation is assembled, answered by the fake
engines of tests/support/fakes.py and streamed as text. Prints ``OK <prompt tokens> <token ids> <heavy modules
loaded>`` (the last a list that must be empty)."""

from __future__ import annotations

import importlib.abc
import sys

HOST_ONLY = ("torch", "transformers", "onnxruntime", "onnx", "rknn")


class BlockHostOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HOST_ONLY:
            raise ImportError(f"{name} is not on the board")
        return None


def main(bundle_dir: str, image: str) -> None:
    import numpy as np

    from support.fakes import FakeLlm, FakeVision
    from rksmolvlm.processing.content import conversation
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.loader import RuntimeBundle
    from rksmolvlm.runtime.runner import Runner

    bundle = RuntimeBundle.open(bundle_dir)
    answer = bundle.tokenizer.encode_text(" A small picture.")
    vision, llm = FakeVision.for_bundle(bundle), FakeLlm([*answer, bundle.stop_ids[0]])
    runner = Runner(bundle, vision, llm)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    generation = runner.generate(messages, GenerationConfig(max_new_tokens=16))
    deltas = list(generation)
    assert generation.finish_reason == "stop", generation.finish_reason
    assert "".join(deltas) == generation.text == "A small picture.", generation.text
    prompt = bundle.assembler.assemble(conversation(messages), [_layout(bundle, image)])
    assert generation.prefill_ids == prompt.ids
    assert llm.prefills[0].embeddings.shape == (generation.prompt_tokens, bundle.manifest.model.text_hidden_size)
    assert np.isfinite(llm.prefills[0].embeddings).all() and vision.tiles > 1
    runner.close()
    assert vision.closed and llm.closed
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HOST_ONLY))
    print("OK", generation.prompt_tokens, generation.token_ids, loaded)


def _layout(bundle, image):
    from rksmolvlm.processing.assembler import Layout
    from rksmolvlm.processing.image import load_image, tile_image

    tiled = tile_image(load_image(image), bundle.settings)
    return Layout(tiled.rows, tiled.cols)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # tests/: the support package
    sys.meta_path.insert(0, BlockHostOnly())
    main(sys.argv[1], sys.argv[2])
