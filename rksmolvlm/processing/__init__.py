"""The processing core shared by the board runtime, the converter and the calibration builders:
typed input (``content``), image → tiles (``image``), chat template and tokenizer (``prompt``),
messages → chunks → one embedding sequence (``assembler``, ``embed``).

Needs only numpy, Pillow, tokenizers and jinja2: nothing here imports torch or transformers.
"""
