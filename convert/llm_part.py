"""The decoder part of a conversion: standalone decoder, embedding table, calibration set in the
installed toolkit's format, and ``llm.rkllm`` (or a host-preview-only bundle with --llm-host-only)."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from rksmolvlm.bundle.manifest import LlmPart
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.assembler import Assembler
from rksmolvlm.processing.prompt import ChatTemplate, PromptTokens, TextTokenizer
from rksmolvlm.convert.llm_recipe import LlmRecipe
from rksmolvlm.convert.progress import Progress
from rksmolvlm.convert.source import Checkpoint

__all__ = ["convert_llm", "LLM_FILE", "EMBED_FILE", "DECODER_DIR"]

LLM_FILE, EMBED_FILE, DECODER_DIR = "llm.rkllm", "embed_tokens.npy", "decoder"


def checkpoint_assembler(checkpoint: Checkpoint) -> Assembler:
    """The runtime's assembler, built from the checkpoint's own files (as the bundle will carry them)."""
    t = checkpoint.tokens
    tokens = PromptTokens(t.image, t.image_id, t.fake_image, t.global_image, checkpoint.vision.image_seq_len,
                          t.end_of_utterance)
    tokenizer = TextTokenizer(checkpoint.path / "tokenizer.json")
    video_template = None
    if checkpoint.video is not None:
        from rksmolvlm.convert.pipeline import video_chat_template

        video_template = ChatTemplate(video_chat_template())
    return Assembler(ChatTemplate(checkpoint.chat_template), tokenizer, tokens, video_template)


def _decoder_max_abs(checkpoint: Checkpoint, decoder_dir: Path) -> float:
    """Logits of the extracted decoder vs the VLM's text path for the same random inputs_embeds."""
    import torch
    import transformers as tf

    cls = tf.Idefics3ForConditionalGeneration if checkpoint.family == "idefics3" else \
        tf.SmolVLMForConditionalGeneration
    torch.manual_seed(0)
    embeds = torch.randn(1, 16, checkpoint.text.hidden_size) * 0.05
    with torch.no_grad():
        vlm = cls.from_pretrained(str(checkpoint.path), dtype=torch.float32).eval()
        reference = vlm(inputs_embeds=embeds).logits
        del vlm
        llm = tf.LlamaForCausalLM.from_pretrained(str(decoder_dir), dtype=torch.float32).eval()
        got = llm(inputs_embeds=embeds).logits
    return float((got - reference).abs().max())


def convert_llm(checkpoint: Checkpoint, recipe: LlmRecipe, options, bundle: Path, work: Path,
                progress: Progress, towers) -> tuple[LlmPart, dict]:
    from rksmolvlm.calibration.decoder_set import load_samples, render_samples, write_dataset
    from rksmolvlm.calibration.vision_set import shipped_images_dir
    from rksmolvlm.convert.decoder import extract_decoder, write_embedding_table
    from rksmolvlm.convert.llm_rkllm import build_rkllm, dataset_format_for, require_toolkit

    with progress.step("extracting the decoder and the embedding table"):
        decoder_dir = (bundle if options.host_preview else work) / DECODER_DIR
        exported = extract_decoder(checkpoint, decoder_dir)
        shape = write_embedding_table(checkpoint, bundle / EMBED_FILE)
        max_abs = _decoder_max_abs(checkpoint, decoder_dir)
        progress.note(f"LlamaForCausalLM with {exported.tensors} tensors (tied: {exported.tied}); logits vs the "
                      f"VLM's text path max-abs {max_abs:.2g}; embeddings {shape[0]}×{shape[1]} float16")
    info = None if options.llm_host_only else require_toolkit()
    section = LlmPart(file=None, toolkit_version=None, max_context=recipe.max_context, embed_tokens=EMBED_FILE,
                      embed_shape=(int(shape[0]), int(shape[1])),
                      decoder_dir=DECODER_DIR if options.host_preview else None, recipe=recipe,
                      board_decoder="missing: converted with --llm-host-only (no rkllm-toolkit)", embed_dtype="float16")
    report = {"recipe": recipe.to_dict(), "decoder_max_abs": max_abs, "calibration": None, "toolkit_version": None}
    if info is None:  # nothing would consume a calibration set
        progress.done += 2
        progress.note("no rkllm-toolkit: the bundle has no board decoder (llm.rkllm); the host preview still runs")
        if not options.host_preview:
            shutil.rmtree(decoder_dir, ignore_errors=True)
        return section, report
    fmt = options.llm_dataset_format or dataset_format_for(info)
    with progress.step(f"rendering the decoder calibration set ({fmt} format)"):
        samples = load_samples(options.llm_prompts)
        own = Path(options.calibration) if options.llm_prompts and options.calibration else None
        images = own or shipped_images_dir()
        embedded = fmt != "text"
        rendered = render_samples(samples, images, checkpoint_assembler(checkpoint), checkpoint.image,
                                  table=EmbeddingTable(bundle / EMBED_FILE) if embedded else None,
                                  features=towers.features if embedded else None, max_tokens=recipe.max_context,
                                  video=checkpoint.video, videos_dir=own,  # own clips beside own images
                                  resolution=options.llm_calibration_resolution,
                                  on_sample=lambda done, total: progress.advance(done, total, "samples"))
        towers.release()
        if embedded:
            progress.note(f"image features: {towers.requested} tiles and frames, {towers.encoded} encoded "
                          f"({towers.engine})")
        dataset = write_dataset(rendered, fmt, work / "llm-calibration")
        tokens = sum(len(r.ids) for r in rendered)
        image_tokens = sum(int(np.sum(np.asarray(r.ids) == checkpoint.tokens.image_id)) for r in rendered)
        skipped = f"; skipped: {len(rendered.skipped_no_video)} with video (the model takes none)" \
            if rendered.skipped_no_video else ""
        progress.note(f"{len(rendered)} of {len(samples)} samples, {tokens} tokens ({image_tokens} image tokens)"
                      f"{skipped}")
    resolution = options.llm_calibration_resolution
    report["calibration"] = {"format": fmt, "samples": len(rendered), "tokens": tokens, "image_tokens": image_tokens,
                             "image_resolution": resolution.label if resolution is not None else "the model's",
                             "skipped_over_context": len(rendered.skipped_over_context),
                             "skipped_no_video": len(rendered.skipped_no_video),
                             "image_features": {"tiles": towers.requested, "encoded": towers.encoded,
                                                "engine": towers.engine} if embedded else None}
    with progress.step(f"building {LLM_FILE} ({recipe.dtype}, {recipe.target}) with rkllm-toolkit {info.version}"):
        build = build_rkllm(decoder_dir, bundle / LLM_FILE, recipe, dataset, info)
    report.update(seconds=build.seconds, toolkit_version=info.version)
    section = replace(section, file=LLM_FILE, board_decoder="present", toolkit_version=info.version)
    if not options.host_preview:
        shutil.rmtree(decoder_dir, ignore_errors=True)
    return section, report
