"""``rknnlite.api.RKNNLite`` with the real class's method signatures (rknn-toolkit-lite2 2.5.0),
backed by onnxruntime on the ``vision.onnx`` that sits beside the ``.rknn`` in a host-preview
bundle. The uint8 NHWC input is normalized the way the RKNN model's baked-in mean/std (127.5)
would. It checks call order, core masks for the emulated SoC (``RKNNLITE_DOUBLE_SOC``, default
rk3588) and the input; it records every instance and call for tests.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

_VALID_MASKS = {"rk3588": {0, 1, 2, 4, 3, 7, 0xFFFF}, "rk3576": {0, 1, 2, 3, 0xFFFF}, "rk3562": {0, 1, 0xFFFF}}


class RKNNLite:
    NPU_CORE_AUTO = 0
    NPU_CORE_0 = 1
    NPU_CORE_1 = 2
    NPU_CORE_2 = 4
    NPU_CORE_0_1 = 3
    NPU_CORE_0_1_2 = 7
    NPU_CORE_ALL = 0xFFFF

    instances: list = []
    _lock = threading.Lock()

    def __init__(self, verbose=False, verbose_file=None):
        self.path = None
        self.session = None
        self.core_mask = None
        self.released = False
        self.calls = []  # (thread name, start, end) per inference
        with RKNNLite._lock:
            RKNNLite.instances.append(self)

    def load_rknn(self, path, key_path=None):
        if not isinstance(path, str) or not path.endswith(".rknn") or not os.path.isfile(path):
            return -1
        onnx = os.path.join(os.path.dirname(path), "vision.onnx")
        if not os.path.isfile(onnx):
            return -1  # the double needs the host-preview ONNX beside the model
        self.path = path
        self._onnx = onnx
        return 0

    def list_devices(self):
        return [], []

    def init_runtime(self, target=None, device_id=None, async_mode=False, core_mask=NPU_CORE_AUTO):
        soc = os.environ.get("RKNNLITE_DOUBLE_SOC", "rk3588")
        if self.path is None or target is not None or async_mode or core_mask not in _VALID_MASKS[soc]:
            return -1
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(self._onnx, options, providers=["CPUExecutionProvider"])
        self.core_mask = core_mask
        return 0

    def inference(self, inputs, data_type=None, data_format=None, inputs_pass_through=None, get_frame_id=False,
                  reuse_outputs=False):
        if self.session is None or self.released:
            return None
        if not isinstance(inputs, list) or len(inputs) != 1:
            return None
        x = inputs[0]
        shape = self.session.get_inputs()[0].shape  # (1, 3, T, T)
        if data_format != "nhwc" or not isinstance(x, np.ndarray) or x.dtype != np.uint8 or \
                x.shape != (shape[0], shape[2], shape[3], shape[1]):
            return None
        start = time.perf_counter()
        delay = float(os.environ.get("RKNNLITE_DOUBLE_DELAY_MS", "0")) / 1000
        if delay:
            time.sleep(delay)
        normalized = ((x.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
        out = self.session.run(None, {self.session.get_inputs()[0].name: np.ascontiguousarray(normalized)})
        self.calls.append((threading.current_thread().name, start, time.perf_counter()))
        return [out[0]]

    def get_sdk_version(self):
        return "rknn-toolkit-lite2 contract double"

    def list_support_target_platform(self, rknn_model=None):
        return {"support_target_platform": ["rk3588", "rk3576", "rk3562"]}

    def release(self):
        self.released = True
        self.session = None
