"""``rkllm.api.RKLLM`` as documented in the RKLLM SDK (1.1.x–1.3.0), checked strictly.

Every call is appended to ``RKLLM.calls`` (class attribute) so tests can assert what the
converter asked for.
"""

from __future__ import annotations

import json
import os
import pickle
import re

from . import __version__

VERSION = tuple(int(x) for x in re.findall(r"\d+", __version__)[:3])

PLATFORM_DTYPES = {
    "rk3588": {"w8a8", "w8a8_g128", "w8a8_g256", "w8a8_g512"},
    "rk3576": {"w4a16", "w4a16_g32", "w4a16_g64", "w4a16_g128", "w8a8"},
    "rk3562": {"w8a8", "w4a16_g32", "w4a16_g64", "w4a16_g128", "w4a8_g32"},
}
PLATFORM_CORES = {"rk3588": {1, 2, 3}, "rk3576": {1, 2}, "rk3562": {1}}
if VERSION < (1, 2):
    PLATFORM_DTYPES.pop("rk3562")
ALGORITHMS = {"normal", "grq"} | ({"gdq"} if VERSION < (1, 3) else set())
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MiniCPMForCausalLM", "Phi3ForCausalLM",
                           "Gemma2ForCausalLM", "Qwen3ForCausalLM"}


def _err(message: str) -> int:
    print(f"E rkllm-double: {message}")
    return -1


def _expected_llama_tensors(cfg: dict) -> dict:
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or hidden // heads
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], hidden)
    return shapes


class RKLLM:
    calls: list = []

    def __init__(self):
        self._config = None
        self._built = None
        RKLLM.calls.append(("__init__", {}))

    # -- load -------------------------------------------------------------------------------
    def load_huggingface(self, model, model_lora=None, device="cpu", dtype="float32", custom_config=None,
                         load_weight=True):
        RKLLM.calls.append(("load_huggingface", dict(model=model, model_lora=model_lora, device=device,
                                                     dtype=dtype, custom_config=custom_config,
                                                     load_weight=load_weight)))
        if device not in ("cpu", "cuda"):
            return _err(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            return _err("no CUDA device")
        if dtype not in ("float32", "float16", "bfloat16"):
            return _err(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
        if model_lora is not None and not os.path.exists(model_lora):
            return _err(f"lora path {model_lora} not found")
        if custom_config is not None and not os.path.isfile(custom_config):
            return _err(f"custom_config {custom_config} not found")
        if not isinstance(model, str) or not os.path.isdir(model):
            return _err(f"model must be a Hugging Face model directory, got {model!r}")
        try:
            with open(os.path.join(model, "config.json")) as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return _err("config.json missing or invalid")
        archs = set(cfg.get("architectures") or [])
        if not archs & SUPPORTED_ARCHITECTURES:
            return _err(f"unsupported architecture {sorted(archs)} (a VLM wrapper or unknown model)")
        if not any(os.path.isfile(os.path.join(model, n)) for n in ("tokenizer.json", "tokenizer.model")):
            return _err("tokenizer not found in the model directory")
        if load_weight:
            from safetensors import safe_open

            files = [n for n in os.listdir(model) if n.endswith(".safetensors")]
            if not files:
                return _err("no safetensors weights")
            found = {}
            for name in files:
                with safe_open(os.path.join(model, name), framework="pt") as f:
                    for key in f.keys():
                        found[key] = tuple(f.get_slice(key).get_shape())
            expected = _expected_llama_tensors(cfg)
            if found != expected:
                missing = sorted(set(expected) - set(found))[:3]
                extra = sorted(set(found) - set(expected))[:3]
                wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])[:3]
                return _err(f"weights do not match config: missing {missing}, unexpected {extra}, shape {wrong}")
        self._config = cfg
        return 0

    def load_gguf(self, model):
        RKLLM.calls.append(("load_gguf", dict(model=model)))
        return _err("gguf is not emulated")

    # -- build ------------------------------------------------------------------------------
    def build(self, do_quantization=True, optimization_level=1, quantized_dtype="w8a8",
              quantized_algorithm="normal", target_platform="rk3588", num_npu_core=3, extra_qparams=None,
              dataset=None, hybrid_rate=0, **kwargs):
        if VERSION < (1, 2) and kwargs:
            raise TypeError(f"build() got an unexpected keyword argument {next(iter(kwargs))!r}")
        unknown = set(kwargs) - {"max_context"}
        if unknown:
            raise TypeError(f"build() got an unexpected keyword argument {unknown.pop()!r}")
        max_context = kwargs.get("max_context", 4096)
        args = dict(do_quantization=do_quantization, optimization_level=optimization_level,
                    quantized_dtype=quantized_dtype, quantized_algorithm=quantized_algorithm,
                    target_platform=target_platform, num_npu_core=num_npu_core, extra_qparams=extra_qparams,
                    dataset=dataset, hybrid_rate=hybrid_rate, max_context=max_context)
        RKLLM.calls.append(("build", args))
        if self._config is None:
            return _err("build() before a successful load_huggingface()")
        platform = str(target_platform).lower()
        dtype = str(quantized_dtype).lower()
        if platform not in PLATFORM_DTYPES:
            return _err(f"target_platform {target_platform!r} not in {sorted(PLATFORM_DTYPES)}")
        if dtype not in PLATFORM_DTYPES[platform]:
            return _err(f"quantized_dtype {quantized_dtype!r} not supported on {platform}")
        algorithm = str(quantized_algorithm).lower()
        if algorithm not in ALGORITHMS:
            return _err(f"quantized_algorithm {quantized_algorithm!r} not in {sorted(ALGORITHMS)}")
        if algorithm in ("grq", "gdq") and not dtype.startswith("w4a16"):
            return _err(f"{algorithm} only supports w4a16 quantization")
        if num_npu_core not in PLATFORM_CORES[platform]:
            return _err(f"num_npu_core {num_npu_core} not in {sorted(PLATFORM_CORES[platform])} for {platform}")
        if optimization_level not in (0, 1):
            return _err("optimization_level must be 0 or 1")
        if not isinstance(do_quantization, bool):
            return _err("do_quantization must be a bool")
        if not (isinstance(hybrid_rate, (int, float)) and 0 <= hybrid_rate < 1):
            return _err("hybrid_rate must be in [0, 1)")
        if not isinstance(max_context, int) or max_context % 32 or not 0 < max_context <= 16384:
            return _err("max_context must be a multiple of 32 and at most 16384")
        if extra_qparams is not None and not os.path.isfile(extra_qparams):
            return _err(f"extra_qparams {extra_qparams} not found")
        dataset_info = None
        if dataset is not None:
            dataset_info = self._check_dataset(dataset, max_context)
            if isinstance(dataset_info, int):
                return dataset_info
        self._built = dict(args, target_platform=platform, quantized_dtype=dtype, dataset_info=dataset_info)
        return 0

    def _check_dataset(self, path, max_context):
        if not isinstance(path, str) or not os.path.isfile(path):
            return _err(f"dataset {path!r} is not a file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError:
            return _err("dataset is not JSON")
        if not isinstance(data, list) or not data:
            return _err("dataset must be a non-empty JSON list")
        hidden = self._config["hidden_size"]
        keys = {frozenset(d) for d in data if isinstance(d, dict)}
        if len(keys) != 1 or len(data) != sum(isinstance(d, dict) for d in data):
            return _err("dataset entries must all be objects with the same keys")
        keyset = next(iter(keys))
        if keyset == {"input", "target"}:
            if not all(isinstance(d["input"], str) and isinstance(d["target"], str) for d in data):
                return _err("text dataset: input and target must be strings")
            return {"format": "text", "samples": len(data)}
        if keyset == {"input_embed", "target"} and (1, 1) <= VERSION < (1, 3):
            tokens = 0
            for d in data:
                e = d["input_embed"]
                if not (isinstance(e, list) and len(e) == 1 and isinstance(e[0], list) and e[0]
                        and all(isinstance(row, list) and len(row) == hidden for row in e[0])):
                    return _err(f"input_embed must be [1, seq, {hidden}]")
                if len(e[0]) > max_context:
                    return _err("input_embed longer than max_context")
                if not isinstance(d["target"], str):
                    return _err("target must be a string")
                tokens += len(e[0])
            return {"format": "embed", "samples": len(data), "tokens": tokens}
        if keyset == {"sample", "token_nums"} and VERSION >= (1, 3):
            import torch

            base = os.path.dirname(os.path.abspath(path))
            tokens = 0
            for d in data:
                sample = os.path.join(base, d["sample"])
                if not isinstance(d["token_nums"], int) or not os.path.isfile(sample):
                    return _err(f"sample {d['sample']!r} missing or token_nums not an int")
                with open(sample, "rb") as f:
                    kwargs = pickle.load(f)
                emb = kwargs.get("inputs_embeds") if isinstance(kwargs, dict) else None
                if not isinstance(emb, torch.Tensor) or not emb.is_floating_point() or \
                        tuple(emb.shape) != (1, d["token_nums"], hidden):
                    return _err(f"{d['sample']}: inputs_embeds must be a float tensor [1, token_nums, {hidden}]")
                if d["token_nums"] > max_context:
                    return _err("sample longer than max_context")
                tokens += d["token_nums"]
            return {"format": "multimodal", "samples": len(data), "tokens": tokens}
        return _err(f"dataset keys {sorted(keyset)} are not a format rkllm-toolkit {__version__} accepts")

    # -- export -----------------------------------------------------------------------------
    def _export(self, export_path, **flags):
        RKLLM.calls.append(("export_rkllm", dict(export_path=export_path, **flags)))
        if self._built is None:
            return _err("export_rkllm() before a successful build()")
        folder = os.path.dirname(os.path.abspath(export_path))
        if not os.path.isdir(folder):
            return _err(f"export directory {folder} does not exist")
        header = json.dumps({k: v for k, v in self._built.items() if k != "dataset"}, sort_keys=True)
        with open(export_path, "wb") as f:
            f.write(b"RKLLM-CONTRACT-DOUBLE\n" + header.encode() + b"\n")
            f.write(f"rkllm-toolkit version: {__version__}".encode())
        return 0

    if VERSION >= (1, 3):
        def export_rkllm(self, export_path, export_tokenizer=True, export_embedding=True):
            return self._export(export_path, export_tokenizer=export_tokenizer, export_embedding=export_embedding)
    else:
        def export_rkllm(self, export_path):
            return self._export(export_path)

    def get_logits(self, inputs):
        RKLLM.calls.append(("get_logits", dict(inputs=inputs)))
        return None

    def chat_model(self, messages, args):
        RKLLM.calls.append(("chat_model", dict(messages=messages, args=args)))
        return None
