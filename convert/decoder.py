"""The SmolLM2 decoder out of a SmolVLM checkpoint: a standalone ``LlamaForCausalLM`` directory
(what rkllm-toolkit's ``load_huggingface`` and the host preview load) and the token-embedding table.

Tensors are copied straight from the checkpoint's safetensors (``model.text_model.*`` →
``model.*``, ``lm_head.weight``), in their stored dtype, without instantiating the VLM: the
2.2B model would need ~9 GB in float32 for nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rksmolvlm.errors import CheckpointError
from rksmolvlm.convert.source import Checkpoint

__all__ = ["DecoderExport", "extract_decoder", "write_embedding_table", "TEXT_PREFIXES"]

# Where the text model lives inside a SmolVLM state dict (transformers 4.4x–5.x save layouts).
TEXT_PREFIXES = ("model.text_model.", "text_model.", "model.language_model.")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class DecoderExport:
    path: Path
    tensors: int
    tied: bool


def _text_tensors(checkpoint: Checkpoint) -> dict:
    from safetensors import safe_open

    files = sorted(checkpoint.path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{checkpoint.path} has no .safetensors weights: the decoder export reads "
                              "safetensors only; re-save the checkpoint with save_pretrained(safe_serialization=True)")
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight":
                    out[key] = f.get_tensor(key)
                    continue
                for prefix in TEXT_PREFIXES:
                    if key.startswith(prefix):
                        out["model." + key[len(prefix):]] = f.get_tensor(key)
                        break
    if "model.embed_tokens.weight" not in out:
        raise CheckpointError(f"{checkpoint.path}: no text-model embedding table in the weights "
                              f"(looked for {', '.join(p + 'embed_tokens.weight' for p in TEXT_PREFIXES)})")
    return out


def extract_decoder(checkpoint: Checkpoint, out_dir: Path) -> DecoderExport:
    """Write a LlamaForCausalLM checkpoint of the text decoder into ``out_dir``."""
    from safetensors.torch import save_file

    tensors = _text_tensors(checkpoint)
    tied = checkpoint.text.tie_word_embeddings
    if tied:
        tensors.pop("lm_head.weight", None)
    elif "lm_head.weight" not in tensors:
        raise CheckpointError(f"{checkpoint.path}: tie_word_embeddings is false but lm_head.weight is missing")
    text_config = dict(checkpoint.config.get("text_config") or {})
    for key in ("_name_or_path", "architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        text_config.pop(key, None)
    dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    config = {
        **text_config,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": checkpoint.text.vocab_size,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "bos_token_id": checkpoint.tokens.bos_id,
        "eos_token_id": list(checkpoint.tokens.eos_ids),
        "pad_token_id": checkpoint.tokens.pad_id,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": checkpoint.tokens.bos_id, "eos_token_id": list(checkpoint.tokens.eos_ids),
                  "pad_token_id": checkpoint.tokens.pad_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    for name in _TOKENIZER_FILES:
        if (checkpoint.path / name).is_file():
            shutil.copy2(checkpoint.path / name, out_dir / name)
    tokenizer_config = out_dir / "tokenizer_config.json"
    if tokenizer_config.is_file():  # the chat template belongs with the tokenizer for the toolkit
        data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        data["chat_template"] = checkpoint.chat_template
        tokenizer_config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return DecoderExport(out_dir, len(tensors), tied)


def write_embedding_table(checkpoint: Checkpoint, path: Path) -> tuple[int, int]:
    """Save the token-embedding table as float16 (vocab × hidden) .npy; return its shape."""
    table = _text_tensors(checkpoint)["model.embed_tokens.weight"]
    array = table.float().numpy().astype(np.float16)
    if array.shape != (checkpoint.text.vocab_size, checkpoint.text.hidden_size):
        raise CheckpointError(f"{checkpoint.path}: embedding table is {array.shape}, config says "
                              f"({checkpoint.text.vocab_size}, {checkpoint.text.hidden_size})")
    np.save(path, array)
    return array.shape
