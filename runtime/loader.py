"""Open a bundle for inference. Reads nothing but the bundle: the typed manifest is the whole
contract, and the processing parts (tokenizer, chat template, assembler) are built from it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from rksmolvlm.bundle.manifest import Manifest
from rksmolvlm.processing.assembler import Assembler
from rksmolvlm.processing.embed import EmbeddingTable
from rksmolvlm.processing.image import ImageSettings
from rksmolvlm.processing.prompt import ChatTemplate, TextTokenizer

if TYPE_CHECKING:  # the video settings' module is imported where a bundle has video
    from rksmolvlm.processing.video_frames import VideoSettings

__all__ = ["RuntimeBundle"]

log = logging.getLogger("rksmolvlm.bundle")


@dataclass
class RuntimeBundle:
    path: Path
    manifest: Manifest
    tokenizer: TextTokenizer
    assembler: Assembler

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "RuntimeBundle":
        from rksmolvlm.errors import BundleError

        manifest = Manifest.read(path)
        manifest.require_parts()
        if verify:
            manifest.verify_files()
        try:
            tokenizer = TextTokenizer(manifest.path(manifest.tokenizer))
        except Exception as exc:  # tokenizers raises its own Exception type
            raise BundleError(f"{manifest.path(manifest.tokenizer)} cannot be read as a tokenizer ({exc}): "
                              "convert the bundle again") from exc
        if manifest.chat_template_file is None:  # read as before: refusing would mean converting again
            log.warning("%s: the chat template is inline in manifest.json, where no sha256 covers it (a bundle "
                        "written before chat_template.jinja): convert the bundle again to have it checked",
                        manifest.root)
        try:
            template = ChatTemplate(manifest.chat_template)
        except Exception as exc:  # jinja2.TemplateSyntaxError
            where = manifest.chat_template_file or "manifest.json: 'chat_template'"
            raise BundleError(f"{where} is not a valid Jinja template ({exc}): convert the bundle again") from exc
        video_template = None
        if manifest.video is not None:
            try:
                video_template = ChatTemplate(manifest.video.chat_template)
            except Exception as exc:  # jinja2.TemplateSyntaxError
                where = manifest.video.chat_template_file or "manifest.json: 'video.chat_template'"
                raise BundleError(f"{where} is not a valid Jinja template ({exc}): convert the bundle again") from exc
        tokens = manifest.tokens.prompt
        for name, content, want in (("image", tokens.image, tokens.image_id),
                                    ("fake_image", tokens.fake_image, None),
                                    ("end_of_utterance", tokens.end_of_utterance, None)):
            got = tokenizer.token_id(content)
            if got is None or (want is not None and got != want):
                shown = f"{content!r}, id {want}" if want is not None else repr(content)
                raise BundleError(f"manifest.json: 'tokens.{name}' ({shown}) "
                                  f"is {'not a token' if got is None else f'id {got}'} in the bundle's tokenizer.json: "
                                  "the two disagree; convert the bundle again")
        return cls(manifest.root, manifest, tokenizer, Assembler(template, tokenizer, tokens, video_template))

    @property
    def settings(self) -> ImageSettings:
        return self.manifest.processor.image

    @property
    def video_settings(self) -> "VideoSettings | None":
        """The frame pipeline's settings; None when the model takes no video."""
        return self.manifest.video.settings if self.manifest.video is not None else None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.manifest.tokens.eos_ids

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    @property
    def image_id(self) -> int:
        return self.manifest.tokens.prompt.image_id

    def file(self, relative: str) -> Path:
        return self.manifest.path(relative)

    def embedding_table(self) -> EmbeddingTable:
        from rksmolvlm.errors import BundleError

        llm = self.manifest.require_llm()
        path = self.file(llm.embed_tokens)
        try:
            table = EmbeddingTable(path)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path} cannot be read as a .npy table ({exc}): convert the bundle again") from exc
        if (table.vocab_size, table.hidden_size) != llm.embed_shape:
            raise BundleError(f"{path} is {table.vocab_size}×{table.hidden_size}, the manifest says "
                              f"{llm.embed_shape[0]}×{llm.embed_shape[1]}: convert again")
        return table
