"""`rksmolvlm convert` with the decoder part, against the rkllm-toolkit contract double (1.2.3 and
1.3.0), without the toolkit (clear error, nothing left; or --llm-host-only), and against the real
toolkit when it is installed."""

import json

import numpy as np
import pytest

from rksmolvlm.calibration.decoder_set import load_samples
from rksmolvlm.bundle import read_manifest, staging_dirs
from rksmolvlm.cli import main
from rksmolvlm.convert.source import open_checkpoint


def _convert(*args):
    return main(["convert", *map(str, args), "-q"])


@pytest.mark.parametrize("name,version,fmt", [("idefics3-256m", "1.3.0", "multimodal"),
                                              ("idefics3-2b", "1.2.3", "embed"),
                                              ("smolvlm2", "1.3.0", "multimodal"),
                                              ("smolvlm2", "1.2.3", "embed")])
def test_full_bundle_with_the_toolkit(tiny_checkpoints, calibration_dir, tmp_path, rkllm_double, name, version,
                                      fmt):
    RKLLM = rkllm_double(version)
    out = tmp_path / "bundle"
    assert _convert(tiny_checkpoints[name], "-o", out, "--calibration", calibration_dir) == 0
    manifest = read_manifest(out)
    written = json.loads((out / "manifest.json").read_text())
    ck = open_checkpoint(str(tiny_checkpoints[name]))
    assert {"vision.rknn", "llm.rkllm", "embed_tokens.npy", "tokenizer.json"} <= set(manifest.files)
    assert manifest.llm.file == "llm.rkllm" and written["llm"]["board_decoder"] == "present"
    assert manifest.toolkits["rkllm-toolkit"] == version == manifest.min_runtime["librkllmrt"]
    assert manifest.llm.max_context == 2048  # the tiny model's trained context caps the 4096 default
    assert manifest.tokens.prompt.image_id == ck.tokens.image_id
    assert manifest.tokens.eos_ids == tuple(ck.tokens.eos_ids)
    assert manifest.chat_template == ck.chat_template
    table = np.load(out / "embed_tokens.npy")
    assert table.shape == (ck.text.vocab_size, ck.text.hidden_size)
    calls = [c for c, _ in RKLLM.calls]
    assert calls == ["__init__", "load_huggingface", "build", "export_rkllm"]
    build = dict(RKLLM.calls)["build"]
    assert (build["quantized_dtype"], build["target_platform"], build["num_npu_core"], build["max_context"]) == \
        ("w8a8", "rk3588", 3, 2048)
    report = json.loads((out / "report.json").read_text())["llm"]
    assert report["calibration"]["format"] == fmt
    assert report["calibration"]["image_tokens"] > 0
    features = report["calibration"]["image_features"]  # each distinct tile once, in onnxruntime on vision.onnx
    assert features["engine"] == "onnxruntime" and 0 < features["encoded"] < features["tiles"]
    # the shipped video samples are rendered for SmolVLM2 and skipped (and counted) for models without video
    video_samples = sum(s.kind == "video" for s in load_samples())
    assert report["calibration"]["skipped_no_video"] == (0 if name == "smolvlm2" else video_samples)
    assert (manifest.video is not None) == (name == "smolvlm2")
    assert report["decoder_max_abs"] < 1e-5
    assert (out / "llm.rkllm").read_bytes().endswith(f"rkllm-toolkit version: {version}".encode())
    assert "decoder" not in {p.split("/")[0] for p in manifest.files}  # only with --host-preview


def test_recipe_options_reach_the_toolkit(tiny_checkpoints, calibration_dir, tmp_path, rkllm_double):
    RKLLM = rkllm_double("1.3.0")
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out, "--calibration", calibration_dir, "--target", "rk3576",
                    "--llm-dtype", "w4a16_g64", "--llm-npu-cores", "1", "--max-context", "1024",
                    "--llm-optimization", "0", "--host-preview", "--llm-calibration-max-tiles", "1") == 0
    build = dict(RKLLM.calls)["build"]
    calibration = json.loads((out / "report.json").read_text())["llm"]["calibration"]
    assert calibration["image_resolution"] == "max_tiles=1"
    assert (build["quantized_dtype"], build["target_platform"], build["num_npu_core"], build["max_context"],
            build["optimization_level"]) == ("w4a16_g64", "rk3576", 1, 1024, 0)
    files = read_manifest(out).files
    assert "decoder/model.safetensors" in files and "vision.onnx" in files


def test_missing_toolkit_is_a_clear_error_and_leaves_nothing(tiny_checkpoints, tmp_path, no_rkllm, capsys):
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out) == 2
    err = capsys.readouterr().err
    assert "rkllm-toolkit is not installed" in err
    assert "rkllm_toolkit-1.3.0-cp311-cp311-linux_x86_64.whl" in err and "--llm-host-only" in err
    assert not out.exists() and not staging_dirs(out)


def test_host_only_bundle_without_the_toolkit(tiny_checkpoints, calibration_dir, tmp_path, no_rkllm):
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["idefics3-2b"], "-o", out, "--llm-host-only", "--host-preview",
                    "--calibration", calibration_dir) == 0
    manifest = read_manifest(out)
    written = json.loads((out / "manifest.json").read_text())
    assert "llm.rkllm" not in manifest.files
    assert manifest.llm.file is None and written["llm"]["board_decoder"].startswith("missing")
    assert manifest.toolkits["rkllm-toolkit"] is None
    assert "embed_tokens.npy" in manifest.files and "decoder/config.json" in manifest.files


@pytest.mark.parametrize("args,match", [(["--llm-dtype", "w4a16"], "w8a8, w8a8_g128"),
                                        (["--max-context", "1000"], "multiple of 32"),
                                        (["--max-context", "4096"], "trained context"),
                                        (["--llm-npu-cores", "4"], "choose 1 to 3"),
                                        (["--llm-calibration-image-size", "100"], "use one of 64, 128, 192"),
                                        (["--llm-calibration-max-tiles", "0"], "max tiles 0 must be")])
def test_invalid_recipe_refused_before_work(tiny_checkpoints, tmp_path, rkllm_double, capsys, args, match):
    RKLLM = rkllm_double("1.3.0")
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out, *args) == 2
    assert match in capsys.readouterr().err
    assert RKLLM.calls == [] and not out.exists() and not staging_dirs(out)


def test_toolkit_failure_leaves_nothing(tiny_checkpoints, calibration_dir, tmp_path, rkllm_double, capsys,
                                        monkeypatch):
    RKLLM = rkllm_double("1.3.0")
    monkeypatch.setattr(RKLLM, "export_rkllm", lambda self, export_path, **kw: -1)
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["smolvlm2"], "-o", out, "--calibration", calibration_dir) == 2
    assert "export_rkllm returned -1" in capsys.readouterr().err
    assert not out.exists() and not staging_dirs(out)


def test_real_toolkit_when_installed(tiny_checkpoints, calibration_dir, tmp_path):
    """Proves the real path on a machine with Rockchip's wheel (skipped here: it is on no registry)."""
    from rksmolvlm.convert.llm_rkllm import toolkit_info

    info = toolkit_info()
    if info is None or "doubles" in __import__("rkllm").__file__:
        pytest.skip("rkllm-toolkit is not installed (download the wheel from airockchip/rknn-llm)")
    out = tmp_path / "b"
    assert _convert(tiny_checkpoints["idefics3-256m"], "-o", out, "--calibration", calibration_dir) == 0
    manifest = read_manifest(out)
    assert manifest.llm.file == "llm.rkllm" and (out / "llm.rkllm").stat().st_size > 0
