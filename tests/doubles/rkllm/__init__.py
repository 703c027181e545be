"""Contract double of Rockchip's rkllm-toolkit (see tests/doubles/README.md)."""

import os

__version__ = os.environ.get("RKLLM_DOUBLE_VERSION", "1.3.0")
