"""`rksmolvlm bench --engine host` on a tiny bundle: every field present and sensible."""

import json

from rksmolvlm.cli import main

FIELDS = {"engine", "model", "target", "repeats", "warmup", "vision_ms_per_tile_one_core",
          "vision_ms_per_tile_all_cores", "vision_split_image_tiles", "vision_split_image_ms", "prompt_tokens",
          "new_tokens", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "engine_perf", "peak_rss_mb",
          "clocks"}


def test_bench_json_has_every_field(preview_bundles, capsys):
    assert main(["bench", str(preview_bundles["smolvlm2"]), "--engine", "host", "--repeats", "2", "--warmup", "1",
                 "--prompt-tokens", "40", "--new-tokens", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert FIELDS <= set(result)
    assert result["engine"] == "host" and result["new_tokens"] == 6
    assert result["vision_split_image_tiles"] == 17  # a square image at the longest edge: 4×4 + global
    for key in ("vision_ms_per_tile_one_core", "vision_ms_per_tile_all_cores", "ttft_ms", "prefill_tokens_per_s",
                "decode_tokens_per_s"):
        s = result[key]
        assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"], key
    assert result["prompt_tokens"] >= 40
    assert result["peak_rss_mb"] > 0


def test_bench_table(preview_bundles, capsys):
    assert main(["bench", str(preview_bundles["idefics3-2b"]), "--engine", "host", "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "decode tokens/s" in out and "TTFT ms" in out and "governors:" in out
