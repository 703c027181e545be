"""rksmolvlm: SmolVLM vision-language models on Rockchip NPUs.

Subpackages: ``convert`` (x86 host: checkpoint → bundle), ``runtime`` (board and host preview:
bundle → answers), ``calibration`` (calibration sets), ``boards`` (per-SoC profiles).
"""

__version__ = "0.1.0"
