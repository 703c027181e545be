"""The processing core shared by the board runtime, the converter and the calibration builders:
typed input (``content``), image → tiles (``image``), video → RGB frames (``video``, PyAV) → sampled,
resized model frames (``video_frames``, ``lanczos``), chat template and tokenizer (``prompt``),
messages → chunks → one embedding sequence (``assembler``, ``embed``).

Needs only numpy, Pillow, tokenizers, jinja2 and (for video) PyAV: nothing here imports torch or
transformers.
"""
