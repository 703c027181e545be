"""The host preview: engines that run the board's pipeline on x86 (onnxruntime tower, torch decoder).

Never imported on the board; ``rksmolvlm.runners`` opens them for ``--engine host``.
"""
