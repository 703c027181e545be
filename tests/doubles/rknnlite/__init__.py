"""Contract double of rknn-toolkit-lite2 (see api/rknn_lite.py)."""
