"""Golden answers and ``rksmolvlm verify``: the conversion records them (and verifies its own host
preview in report.json), the host engines agree 100 %, a damaged tower is caught with a non-zero
exit, the board engines run against the RKNNLite and librkllmrt contract doubles, ``--json``, and a
bundle without goldens names the fix."""

import ctypes
import json
import shutil
import subprocess

import numpy as np
import pytest

from support import DOUBLES
from support.fakes import LlmWrapper
from rksmolvlm.cli import main
from rksmolvlm.runtime.loader import RuntimeBundle
from rksmolvlm.runtime.runner import Runner
from rksmolvlm.tools.verify import CASES_FILE, GOLDENS_DIR, load_goldens, verify_bundle


def _verify(capsys, *argv):
    code = main(["verify", *map(str, argv)])
    return code, capsys.readouterr()


def test_conversion_records_goldens_and_verifies_its_host_preview(preview_bundles):
    for name, path in preview_bundles.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["goldens"]["new_tokens"] == 16
        cases = json.loads((path / GOLDENS_DIR / CASES_FILE).read_text())
        names = [c["name"] for c in cases["cases"]]
        assert names[:4] == ["photo", "document", "two_images", "text"]
        assert ("video" in names) == (name == "smolvlm2")
        for case in cases["cases"]:
            assert case["token_ids"] and case["prompt_ids"]
            assert (case["tiles"] == 0) == (case["name"] == "text")
        for input_name, sha in cases["inputs"].items():  # the inputs travel with the bundle, listed in files
            assert manifest["files"][f"goldens/inputs/{input_name}"]["sha256"] == sha
        assert f"{GOLDENS_DIR}/features.npz" in manifest["files"]
        size = sum(r["size"] for k, r in manifest["files"].items() if k.startswith(GOLDENS_DIR))
        assert size < 600_000
        report = json.loads((path / "report.json").read_text())
        assert report["verify"]["verdict"] == "pass" and report["verify"]["agreement"] == 1.0


@pytest.mark.parametrize("name", ["idefics3-256m", "smolvlm2"])
def test_host_engines_agree_fully(preview_bundles, capsys, name):
    code, out = _verify(capsys, preview_bundles[name], "--engine", "host", "--json")
    assert code == 0, out.out
    result = json.loads(out.out)
    assert result["verdict"] == "pass" and result["engine"] == "host" and result["failures"] == []
    assert set(result) >= {"bundle", "reference", "agreement", "min_agreement", "min_cosine", "cases", "notes"}
    for case in result["cases"]:
        assert set(case) >= {"name", "tile_cosines", "first_divergence", "agreement", "exact", "prompt_match",
                             "reference_ids", "generated_ids", "min_tile_cosine"}
        assert case["exact"] and case["agreement"] == 1.0 and case["prompt_match"]
        assert case["first_divergence"] == case["reference_tokens"]
        assert all(c > 0.9999 for c in case["tile_cosines"])
    assert {c["name"] for c in result["cases"] if c["tile_cosines"]} >= {"photo", "document", "two_images"}


def _damaged(src, dst, scale: float):
    """A copy of ``src`` whose vision.onnx has noisy weights, its manifest record updated (a
    consistent bundle, as a bad conversion would write it)."""
    import onnx
    from onnx import numpy_helper

    from rksmolvlm.bundle import file_record

    shutil.copytree(src, dst)
    model = onnx.load(dst / "vision.onnx")
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 1:
            noisy = w + rng.normal(0, scale * (float(w.std()) + 1e-3), w.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, dst / "vision.onnx")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["vision.onnx"] = file_record(dst / "vision.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def damaged(preview_bundles, tmp_path_factory):
    return _damaged(preview_bundles["idefics3-256m"], tmp_path_factory.mktemp("verify") / "damaged", scale=2.0)


def test_damaged_tower_is_caught(damaged, capsys):
    code, out = _verify(capsys, damaged, "--json")
    assert code == 1
    result = json.loads(out.out)
    assert result["verdict"] == "fail"
    by_name = {c["name"]: c for c in result["cases"]}
    assert by_name["photo"]["min_tile_cosine"] < 0.9
    assert any(not c["exact"] for c in result["cases"] if c["tile_cosines"])  # the damage reaches the answers
    assert by_name["text"]["exact"]  # text only: no tower involved
    assert any("tower cosine" in f for f in result["failures"])


def test_text_report_and_floors_as_flags(damaged, capsys):
    code, out = _verify(capsys, damaged, "--min-agreement", "0", "--min-cosine", "-1")
    assert code == 0
    assert "verdict: PASS" in out.out and "document" in out.out and "tower cosine" in out.out
    assert "before the first divergence" in out.out
    code, out = _verify(capsys, damaged, "--min-agreement", "1.5")
    assert code != 0 and "--min-agreement" in out.err


def test_sim_runs_the_tower_in_the_simulator_and_says_what_it_does_not_simulate(preview_bundles, capfd,
                                                                               monkeypatch):
    # capfd: the toolkit's output is captured at the file-descriptor level around the build. The bundle is
    # named relative to the working directory, as users type it (rknn-toolkit2 runs in a directory of its own).
    bundle = preview_bundles["idefics3-256m"]
    monkeypatch.chdir(bundle.parent)
    code, out = _verify(capfd, bundle.name, "--engine", "sim", "--json")
    assert out.out.startswith("{"), out.err[-2000:]
    result = json.loads(out.out)
    assert code == 0 and result["engine"] == "sim" and result["min_agreement"] == 0.5
    assert any("rknn-toolkit2 simulator" in n for n in result["notes"])
    assert any("rkllm-toolkit" in n and "torch" in n for n in result["notes"])
    assert all(c > 0.99 for case in result["cases"] for c in case["tile_cosines"])  # fp16


def test_bundle_without_goldens_says_convert_again(preview_bundles, tmp_path, capsys):
    bundle = tmp_path / "old"
    shutil.copytree(preview_bundles["idefics3-256m"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["goldens"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, out = _verify(capsys, bundle)
    assert code != 0
    assert "no golden answers" in out.err and "convert" in out.err


def test_no_goldens_flag_skips_them_and_verify_says_why(tiny_checkpoints, calibration_dir, tmp_path, capsys):
    bundle = tmp_path / "b"
    assert main(["convert", str(tiny_checkpoints["smolvlm2"]), "-o", str(bundle), "--llm-host-only",
                 "--host-preview", "--calibration", str(calibration_dir), "--no-goldens", "-q"]) == 0
    capsys.readouterr()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "goldens" not in manifest and not (bundle / "goldens").exists()
    assert "goldens" not in json.loads((bundle / "report.json").read_text())
    code, out = _verify(capsys, bundle)
    assert code != 0 and "--no-goldens" in out.err


# -- the board engines against the contract doubles -------------------------------------------------
@pytest.fixture(scope="module")
def librkllmrt(tmp_path_factory):
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    path = tmp_path_factory.mktemp("rkllm-verify") / "librkllmrt.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-DRKLLM_ABI=130", "-o", str(path),
                    str(DOUBLES / "librkllmrt" / "rkllm_double.c"), "-lpthread"], check=True)
    return path


class _ScriptedBoard(LlmWrapper):
    """The RkllmEngine on the librkllmrt double; before each generation the double is given the
    next case's script (the double streams what it is told: it runs no model)."""

    def __init__(self, engine, lib, scripts):
        super().__init__(engine)
        self.lib, self.scripts = lib, list(scripts)

    def generate(self, embeddings, config, keep_history, stats):
        for token in self.scripts.pop(0):
            assert self.lib.double_script_push(token, b"x", 0) == 0
        return self.llm.generate(embeddings, config, keep_history, stats)


def _board(bundle, library, scripts, model):
    from rksmolvlm.runtime.engines import GenerationConfig
    from rksmolvlm.runtime.npu_engines import RkllmEngine

    lib = ctypes.CDLL(str(library))
    lib.double_script_push.argtypes = [ctypes.c_int32, ctypes.c_char_p, ctypes.c_int]
    lib.double_reset()
    lib.double_set_hidden(bundle.manifest.model.text_hidden_size)
    model.write_bytes(b"model")  # the double checks the file exists, not what it holds
    engine = RkllmEngine(model, library, "1.3", bundle.max_context, GenerationConfig(max_new_tokens=64))
    return _ScriptedBoard(engine, lib, scripts)


def test_npu_engines_against_the_doubles(preview_bundles, rknnlite_double, librkllmrt, tmp_path):
    from rksmolvlm.runtime.npu_engines import RknnLiteVisionEncoder

    bundle = RuntimeBundle.open(preview_bundles["idefics3-256m"])
    goldens = load_goldens(bundle)
    vision = RknnLiteVisionEncoder(bundle.file("vision.rknn"), [1, 2, 4])
    good = [c.token_ids for c in goldens.cases]
    llm = _board(bundle, librkllmrt, good, tmp_path / "llm.rkllm")
    runner = Runner(bundle, vision, llm, image_cache_size=0)
    try:
        result = verify_bundle(runner, "npu")
        assert result.passed and result.agreement == 1.0
        assert all(c.prompt_match for c in result.cases)
        assert all(v > 0.9999 for c in result.cases for v in c.tile_cosines)
        assert rknnlite_double.instances and all(r.calls for r in rknnlite_double.instances)
        # a board decoder that drifts at token 5 of the photo case
        bad = [list(t) for t in good]
        bad[0][5] = (bad[0][5] + 1) % bundle.manifest.model.vocab_size
        llm.scripts = bad
        result = verify_bundle(runner, "npu", min_agreement=0.9)
        photo = result.cases[0]
        assert photo.first_divergence == 5 and not photo.exact and photo.agreement == 5 / photo.reference_tokens
        assert not result.passed and any("photo" in f for f in result.failures)
    finally:
        vision.close()
        llm.close()
