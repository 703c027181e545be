"""The decoder calibration set: shipped chats rendered exactly as transformers would (token ids),
with the real image features spliced at the image tokens (the VLM's own inputs_embeds), written
in each toolkit format and accepted by the toolkit contract double. Video samples (SmolVLM2) are
sampled, decoded and resized by the runtime's frame pipeline and rendered by the same assembler;
other models skip them."""

import json
import pickle

import numpy as np
import pytest
import torch
import transformers as tf

from rksmolvlm.calibration.decoder_set import (CALIBRATION_MAX_FRAMES, load_samples, render_samples,
                                               shipped_videos_dir, write_dataset)
from rksmolvlm.calibration.vision_set import shipped_images_dir
from rksmolvlm.convert.decoder import write_embedding_table
from rksmolvlm.convert.llm_part import checkpoint_assembler
from rksmolvlm.convert.pipeline import TowerCache
from rksmolvlm.convert.source import open_checkpoint
from rksmolvlm.errors import CalibrationError
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.image import Resolution, normalize, preprocess

KINDS = {"caption", "vqa", "document", "chart", "screenshot", "scene_text", "diagram", "multi_image",
         "multi_turn", "video", "text_only"}
# The shipped clips and the frames each gives at SmolVLM2's 1 frame per second (round(fps × duration))
CLIP_FRAMES = {"video_astronaut_zoom_out.mp4": 10, "video_report_scroll.mp4": 12, "video_chart_drawing.mp4": 10}


def test_shipped_prompts_cover_every_kind_and_image():
    samples = load_samples()
    assert {s.kind for s in samples} == KINDS
    used = {name for s in samples for name in s.image_names()}
    shipped = {p.name for p in shipped_images_dir().iterdir()}
    assert used <= shipped
    assert used == shipped, f"images never used: {sorted(shipped - used)}"
    multi_turn_new_image = [s for s in samples if s.kind == "multi_turn" and
                            any(p.get("type") == "image" for m in s.messages[1:] if isinstance(m["content"], list)
                                for p in m["content"])]
    assert len(multi_turn_new_image) >= 2
    videos = {name for s in samples for name in s.video_names()}
    assert videos == {p.name for p in shipped_videos_dir().iterdir()} == set(CLIP_FRAMES)
    assert all(s.kind == "video" for s in samples if s.video_names())


def test_shipped_clips_are_small_h264_yuv420p():
    av = pytest.importorskip("av")
    for name, frames in CLIP_FRAMES.items():
        path = shipped_videos_dir() / name
        assert path.stat().st_size < 150_000, name
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p"), name
            assert stream.width % 2 == 0 and stream.height % 2 == 0
            assert round(float(stream.duration * stream.time_base)) == frames, name


def _pick(samples, kinds):
    return [next(s for s in samples if s.kind == k) for k in kinds]


@pytest.fixture(scope="module")
def rendered(tiny_checkpoints, tmp_path_factory):
    """Rendered samples (one of each kind with images, plus text-only) for each checkpoint."""
    out = {}
    samples = _pick(load_samples(), ["caption", "multi_image", "multi_turn", "text_only", "document"])
    for name, path in tiny_checkpoints.items():
        ck = open_checkpoint(str(path))
        table_path = tmp_path_factory.mktemp(name) / "embed_tokens.npy"
        write_embedding_table(ck, table_path)
        towers = TowerCache(ck)
        out[name] = (ck, samples, render_samples(samples, shipped_images_dir(), checkpoint_assembler(ck), ck.image,
                                                  table=EmbeddingTable(table_path),
                                                  features=towers.features))
    return out


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b"])
def test_prompt_ids_equal_transformers_processor(rendered, name, tiny_checkpoints):
    ck, samples, results = rendered[name]
    processor = tf.AutoProcessor.from_pretrained(tiny_checkpoints[name])
    for sample, r in zip(samples, results):
        messages = [{"role": m["role"], "content": [{"type": p["type"],
                                                     **({"text": p["text"]} if p["type"] == "text" else {})}
                                                    for p in m["content"]]} for m in sample.messages]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [tf.image_utils.load_image(str(shipped_images_dir() / n)) for n in sample.image_names()]
        inputs = processor(text=text, images=[images] if images else None, return_tensors="np")
        assert r.ids[:r.prompt_len] == inputs["input_ids"][0].tolist(), sample.id
        assert r.ids[r.prompt_len:] == processor.tokenizer(sample.answer + "<end_of_utterance>",
                                                           add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b", "smolvlm2"])
def test_embeddings_equal_the_vlms_inputs_embeds(rendered, name, tiny_checkpoints):
    ck, samples, results = rendered[name]
    model = tf.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints[name]).eval()
    captured = {}
    model.model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    for sample, r in zip(samples, results):
        kwargs = {"input_ids": torch.tensor([r.ids])}
        names = sample.image_names()
        if names:
            tiles = np.concatenate([preprocess(shipped_images_dir() / n, ck.image).tiles for n in names])
            kwargs["pixel_values"] = torch.from_numpy(normalize(tiles, ck.image))[None]
        with torch.no_grad():
            model(**kwargs)
        expected = captured["inputs_embeds"][0].numpy()
        image_rows = np.asarray(r.ids) == ck.tokens.image_id
        assert image_rows.sum() == (len(kwargs.get("pixel_values", [[]])[0]) * ck.vision.image_seq_len)
        np.testing.assert_allclose(r.embeddings[image_rows], expected[image_rows], atol=2e-5, rtol=0)
        # text rows come from the float16 table the board uses: the VLM's rows rounded to float16
        assert np.array_equal(r.embeddings[~image_rows], expected[~image_rows].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("version,fmt", [("1.2.3", "text"), ("1.2.3", "embed"), ("1.3.0", "text"),
                                         ("1.3.0", "multimodal")])
def test_formats_are_accepted_by_the_toolkit_double(rendered, tmp_path, rkllm_double, version, fmt):
    ck, _, results = rendered["smolvlm2"]
    path = write_dataset(results, fmt, tmp_path / "ds")
    RKLLM = rkllm_double(version)
    llm = RKLLM()
    decoder = tmp_path / "decoder"
    from rksmolvlm.convert.decoder import extract_decoder

    extract_decoder(ck, decoder)
    assert llm.load_huggingface(model=str(decoder)) == 0
    assert llm.build(dataset=str(path), max_context=2048) == 0
    built = RKLLM.calls[-1][1]
    assert built["dataset"] == str(path)
    assert llm._built["dataset_info"]["format"] == fmt
    assert llm._built["dataset_info"]["samples"] == len(results)
    if fmt != "text":
        assert llm._built["dataset_info"]["tokens"] == sum(len(r.ids) for r in results)


def test_multimodal_pickles_hold_the_spliced_embeddings(rendered, tmp_path):
    ck, _, results = rendered["idefics3-256m"]
    path = write_dataset(results, "multimodal", tmp_path)
    index = json.loads(path.read_text())
    for entry, r in zip(index, results):
        with open(tmp_path / entry["sample"], "rb") as f:
            kwargs = pickle.load(f)
        assert entry["token_nums"] == len(r.ids)
        assert kwargs["inputs_embeds"].shape == (1, len(r.ids), ck.text.hidden_size)
        assert np.array_equal(kwargs["inputs_embeds"][0].numpy(), r.embeddings)


def test_double_refuses_the_wrong_format_for_its_version(rendered, tmp_path, rkllm_double):
    ck, _, results = rendered["smolvlm2"]
    from rksmolvlm.convert.decoder import extract_decoder

    extract_decoder(ck, tmp_path / "decoder")
    for version, fmt in (("1.3.0", "embed"), ("1.2.3", "multimodal")):
        RKLLM = rkllm_double(version)
        llm = RKLLM()
        assert llm.load_huggingface(model=str(tmp_path / "decoder")) == 0
        assert llm.build(dataset=str(write_dataset(results, fmt, tmp_path / fmt)), max_context=2048) == -1


# -- video samples ------------------------------------------------------------------------------------
def _video_samples():
    samples = load_samples()
    return [s for s in samples if s.kind == "video"] + _pick(samples, ["caption"])


@pytest.fixture(scope="module")
def rendered_video(tiny_checkpoints, tmp_path_factory):
    """The video samples (and one image sample) of the SmolVLM2 tiny checkpoint, with embeddings."""
    ck = open_checkpoint(str(tiny_checkpoints["smolvlm2"]))
    assert ck.video is not None
    table_path = tmp_path_factory.mktemp("smolvlm2-video") / "embed_tokens.npy"
    write_embedding_table(ck, table_path)
    samples = _video_samples()
    results = render_samples(samples, shipped_images_dir(), checkpoint_assembler(ck), ck.image,
                             table=EmbeddingTable(table_path), features=TowerCache(ck).features, video=ck.video)
    assert [r.id for r in results] == [s.id for s in samples] and not results.skipped_no_video
    return ck, samples, results


def _frames(ck, name, max_frames=CALIBRATION_MAX_FRAMES):
    """The sampled, decoded and resized frames of a shipped clip, with their timestamps and the duration."""
    from rksmolvlm.processing.video import probe_video, read_frames
    from rksmolvlm.processing.video_frames import frame_timestamps, resize_frames, sample_indices

    path = shipped_videos_dir() / name
    info = probe_video(path)
    indices = sample_indices(info.total_num_frames, info.duration, info.fps, ck.video.fps,
                             min(max_frames, ck.video.max_frames), ck.video.skip_secs)
    return resize_frames(read_frames(path, indices), ck.video), frame_timestamps(indices, info.fps), info.duration


def test_video_samples_hold_one_image_block_per_sampled_frame(rendered_video):
    ck, samples, results = rendered_video
    for sample, r in zip(samples, results):
        frames = sum(CLIP_FRAMES[n] for n in sample.video_names())
        if not frames:
            continue
        ids = np.asarray(r.ids)
        assert (ids == ck.tokens.image_id).sum() == frames * ck.vision.image_seq_len, sample.id
        assert (ids == ck.tokens.global_image_id).sum() == frames, sample.id
        assert r.prompt_text.count("\nFrame from 00:") == frames
        assert r.prompt_text.startswith("<|im_start|>User: You are provided the following series of ")


def test_video_prompt_ids_equal_transformers_video_expansion(rendered_video, tiny_checkpoints):
    """The prompt is transformers' DEFAULT_CHAT_TEMPLATE with <video> replaced by its own
    SmolVLMProcessor.replace_video_token for the same frames, timestamps and duration."""
    from types import SimpleNamespace

    from transformers.models.smolvlm import processing_smolvlm as hf

    ck, samples, results = rendered_video
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_checkpoints["smolvlm2"])
    processor = SimpleNamespace(image_seq_len=ck.vision.image_seq_len, image_token="<image>",
                                fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    for sample, r in zip(samples, results):
        if not sample.video_names():
            continue
        (name,) = sample.video_names()
        frames, timestamps, duration = _frames(ck, name)
        metadata = SimpleNamespace(fps=1.0, timestamps=list(timestamps), duration=duration)
        expansion = hf.SmolVLMProcessor.replace_video_token(
            processor, {"pixel_values": np.zeros((1, len(frames))), "video_metadata": [metadata]}, 0)
        messages = [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text"
                                                                          else {})} for p in m["content"]]}
                    for m in sample.messages]
        text = tokenizer.apply_chat_template(messages, chat_template=hf.DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
        assert text.count("<video>") == 1
        expected = tokenizer(text.replace("<video>", expansion), add_special_tokens=False)["input_ids"]
        assert r.ids[:r.prompt_len] == expected, sample.id
        assert r.ids[r.prompt_len:] == tokenizer(sample.answer + "<end_of_utterance>",
                                                 add_special_tokens=False)["input_ids"]


def test_video_embeddings_equal_the_vlms_inputs_embeds(rendered_video, tiny_checkpoints):
    """Frame rows hold the SmolVLM model's own image features for the same pixel values (the frames
    as unsplit tiles), text rows the float16 table's rows."""
    ck, samples, results = rendered_video
    model = tf.AutoModelForImageTextToText.from_pretrained(tiny_checkpoints["smolvlm2"]).eval()
    captured = {}
    model.model.text_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
    for sample, r in zip(samples, results):
        if not sample.video_names():
            continue
        (name,) = sample.video_names()
        frames, _, _ = _frames(ck, name)
        pixel_values = torch.from_numpy(normalize(frames, ck.image))[None]
        with torch.no_grad():
            model(input_ids=torch.tensor([r.ids]), pixel_values=pixel_values)
            features = model.model.get_image_features(pixel_values)
        features = getattr(features, "pooler_output", features)
        expected = captured["inputs_embeds"][0].numpy()
        frame_rows = np.asarray(r.ids) == ck.tokens.image_id
        assert frame_rows.sum() == len(frames) * ck.vision.image_seq_len == CLIP_FRAMES[name] * ck.vision.image_seq_len
        np.testing.assert_allclose(r.embeddings[frame_rows], expected[frame_rows], atol=2e-5, rtol=0)
        np.testing.assert_allclose(r.embeddings[frame_rows],
                                   torch.cat(list(features)).reshape(-1, ck.text.hidden_size).numpy(), atol=2e-5,
                                   rtol=0)
        assert np.array_equal(r.embeddings[~frame_rows], expected[~frame_rows].astype(np.float16).astype(np.float32))


def test_video_samples_write_every_format(rendered_video, tmp_path):
    ck, _, results = rendered_video
    for fmt in ("text", "embed", "multimodal"):
        path = write_dataset(results, fmt, tmp_path / fmt)
        assert path.is_file()
    text = json.loads((tmp_path / "text" / "dataset_text.json").read_text())
    assert all(record["input"].count("<image>") == (np.asarray(r.ids) == ck.tokens.image_id).sum()
               for record, r in zip(text, results))


def test_frame_count_follows_max_frames_and_the_context(tiny_checkpoints):
    ck = open_checkpoint(str(tiny_checkpoints["smolvlm2"]))
    assembler = checkpoint_assembler(ck)
    samples = [s for s in load_samples() if s.kind == "video"]
    few = render_samples(samples, shipped_images_dir(), assembler, ck.image, video=ck.video, max_frames=4)
    for sample, r in zip(samples, few):
        assert (np.asarray(r.ids) == ck.tokens.image_id).sum() == 4 * ck.vision.image_seq_len, sample.id
    longest = max(len(r.ids) for r in few)
    some = render_samples(samples, shipped_images_dir(), assembler, ck.image, video=ck.video, max_frames=4,
                          max_tokens=longest - 1)
    assert len(some) + len(some.skipped_over_context) == len(samples) and some.skipped_over_context


def test_calibration_frames_are_the_runtimes_default():
    from rksmolvlm.runtime.video import DEFAULT_BOARD_MAX_FRAMES

    assert CALIBRATION_MAX_FRAMES == DEFAULT_BOARD_MAX_FRAMES


@pytest.mark.parametrize("name", ["idefics3-256m", "idefics3-2b"])
def test_models_without_video_skip_video_samples(tiny_checkpoints, name):
    ck = open_checkpoint(str(tiny_checkpoints[name]))
    assert ck.video is None
    samples = _video_samples()
    results = render_samples(samples, shipped_images_dir(), checkpoint_assembler(ck), ck.image, video=ck.video)
    assert [r.id for r in results] == [s.id for s in samples if not s.video_names()]
    assert results.skipped_no_video == [s.id for s in samples if s.video_names()]
    assert not results.skipped_over_context
    with pytest.raises(CalibrationError, match="takes no video"):
        render_samples([s for s in samples if s.video_names()], shipped_images_dir(), checkpoint_assembler(ck),
                       ck.image, video=ck.video)


def _render_embedded(ck, samples, table_path, towers):
    return render_samples(samples, shipped_images_dir(), checkpoint_assembler(ck), ck.image,
                          table=EmbeddingTable(table_path), features=towers.features)


def test_feature_cache_encodes_each_distinct_tile_once(tiny_checkpoints, tmp_path):
    """The same samples twice (every image shown again): identical embeddings, each tile through the
    tower once with the cache, every time without it."""
    ck = open_checkpoint(str(tiny_checkpoints["idefics3-256m"]))
    write_embedding_table(ck, tmp_path / "embed_tokens.npy")
    samples = _pick(load_samples(), ["caption", "multi_image", "document"]) * 2
    cached, plain = TowerCache(ck), TowerCache(ck)
    plain.memoize = False
    got = _render_embedded(ck, samples, tmp_path / "embed_tokens.npy", cached)
    want = _render_embedded(ck, samples, tmp_path / "embed_tokens.npy", plain)
    for a, b in zip(got, want):
        assert np.array_equal(a.embeddings, b.embeddings)
    assert cached.requested == plain.requested == plain.encoded
    distinct = {t.tobytes() for s in samples[:3] for p in s.image_names()
                for t in preprocess(shipped_images_dir() / p, ck.image).tiles}
    assert cached.encoded == len(distinct) and 2 * cached.encoded <= plain.encoded


def test_onnx_features_stand_in_for_torch(tiny_checkpoints, tmp_path):
    """After the conversion's ONNX check, the cache encodes in onnxruntime: same features within the
    check's bar; a failing check keeps torch."""
    from rksmolvlm.convert.metrics import cosine, max_abs
    from rksmolvlm.convert.vision_tower import ONNX_MATCH_COSINE, OnnxCheck, check_onnx, export_onnx

    ck = open_checkpoint(str(tiny_checkpoints["smolvlm2"]))
    tiles = preprocess(shipped_images_dir() / "photo_astronaut_square.jpg", ck.image).tiles
    torch_towers = TowerCache(ck)
    reference = torch_towers.features(tiles)
    onnx_towers = TowerCache(ck)
    onnx_path = tmp_path / "vision.onnx"
    export_onnx(onnx_towers.tower, onnx_path, ck.vision.tile_size)
    check = check_onnx(onnx_path, normalize(tiles[:2], ck.image), reference[:2])
    assert not onnx_towers.use_onnx(onnx_path, OnnxCheck(2, 1.0, 0.9))
    assert onnx_towers.engine == "torch"
    assert onnx_towers.use_onnx(onnx_path, check) and onnx_towers.engine == "onnxruntime"
    onnx_towers.release()  # no torch model from here on: onnxruntime alone
    got = onnx_towers.features(tiles)
    assert onnx_towers._tower is None and onnx_towers.encoded == len(tiles)
    assert cosine(got, reference) >= ONNX_MATCH_COSINE and max_abs(got, reference) <= 1e-4


def test_progress_is_reported_per_sample(tiny_checkpoints):
    ck = open_checkpoint(str(tiny_checkpoints["idefics3-256m"]))
    samples = _pick(load_samples(), ["caption", "text_only", "video"])  # the video one is skipped: still counted
    seen = []
    render_samples(samples, shipped_images_dir(), checkpoint_assembler(ck), ck.image,
                   on_sample=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("budget", [Resolution(max_tiles=4), Resolution(longest_edge=2 * 128), Resolution(split=False)])
def test_calibration_at_a_resolution_budget_equals_transformers(tiny_checkpoints, tmp_path, budget):
    """--llm-calibration-*: every image rendered at the budget a service runs with: prompt ids equal
    transformers' processor with the budget's settings for that image, and fewer tiles than the full split."""
    path = tiny_checkpoints["idefics3-256m"]
    ck = open_checkpoint(str(path))
    assert ck.image.tile_size == 128 and ck.image.longest_edge > 2 * 128  # the budgets above cut the split
    write_embedding_table(ck, tmp_path / "embed_tokens.npy")
    samples = _pick(load_samples(), ["caption", "multi_image", "document"])
    budgeted, full = TowerCache(ck), TowerCache(ck)
    got = render_samples(samples, shipped_images_dir(), checkpoint_assembler(ck), ck.image,
                         table=EmbeddingTable(tmp_path / "embed_tokens.npy"), features=budgeted.features,
                         resolution=budget)
    _render_embedded(ck, samples, tmp_path / "embed_tokens.npy", full)
    assert budgeted.encoded < full.encoded
    processor = tf.AutoProcessor.from_pretrained(path)
    for sample, r in zip(samples, got):
        messages = [{"role": m["role"], "content": [{"type": p["type"],
                                                     **({"text": p["text"]} if p["type"] == "text" else {})}
                                                    for p in m["content"]]} for m in sample.messages]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = []
        for name in sample.image_names():  # one image per call: each image has its own settings
            image = tf.image_utils.load_image(str(shipped_images_dir() / name))
            settings = budget.settings(ck.image, image.size)
            kwargs = {"size": {"longest_edge": settings.longest_edge},
                      "do_image_splitting": settings.do_image_splitting}
            single = processor(text="<image>", images=[[image]], return_tensors="np", **kwargs)["input_ids"][0]
            ids.append(single.tolist())
        want = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
        expanded = []
        blocks = iter(ids)
        for token in want:  # each <image> of the chat replaced by that image's own expansion
            expanded.extend(next(blocks) if token == image_token else [token])
        assert r.ids[:r.prompt_len] == expanded, sample.id
