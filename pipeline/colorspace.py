"""Colour-space views for CMC (002_*.txt Sect. 4.1): L|ab and Y|DbDr, built from DALI operators.

DALI has no Lab operator, so Lab is composed from `fn.coord_transform` (3×3 matrices on the
channel vector) and `nvidia.dali.math` (pow, cbrt), with the piecewise functions written as
mask arithmetic. The constants are the sRGB / D65 (2° observer) ones scikit-image uses, which the
tests take as the reference. The same graph nodes run on CPU or GPU: pass the device of the input.

`lab_node` / `ydbdr_node` take an HWC float node with values in [0, 1]; `normalize_node` applies
CMC's normalisation. `convert(images, space)` runs the conversion alone on the CPU.
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath

# sRGB (linear) → XYZ, D65 white, 2° observer (skimage.color.colorconv.xyz_from_rgb)
XYZ_FROM_RGB = [0.412453, 0.357580, 0.180423,
                0.212671, 0.715160, 0.072169,
                0.019334, 0.119193, 0.950227]
D65_WHITE = (0.95047, 1.0, 1.08883)
YDBDR_FROM_RGB = [0.299, 0.587, 0.114,
                  -0.45, -0.883, 1.333,
                  -1.333, 1.116, 0.217]
# CMC normalisation: Lab mean/std and YDbDr mean/std
LAB_MEAN, LAB_STD = (50.0, 6.025, -6.6895), (50.0, 92.208, 101.1675)
YDBDR_MEAN, YDBDR_STD = (0.5, 0.0, 0.0), (0.5, 1.333, 1.333)
SPACES = ("lab", "ydbdr")


def _select(mask, if_true, if_false):
    """Elementwise where() as arithmetic (DALI graphs have no elementwise select)."""
    m = fn.cast(mask, dtype=types.FLOAT)
    return m * if_true + (1.0 - m) * if_false


def lab_node(rgb):
    """CIE L*a*b* of an HWC float node with sRGB values in [0, 1]."""
    linear = _select(rgb > 0.04045, dmath.pow((rgb + 0.055) / 1.055, 2.4), rgb / 12.92)  # sRGB EOTF
    white_scaled = [m / D65_WHITE[i // 3] for i, m in enumerate(XYZ_FROM_RGB)]  # XYZ / white, one matrix
    t = fn.coord_transform(linear, M=white_scaled)
    f = _select(t > 0.008856, dmath.cbrt(t), 7.787 * t + 16.0 / 116.0)
    # L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z))
    return fn.coord_transform(f, M=[0.0, 116.0, 0.0, 500.0, -500.0, 0.0, 0.0, 200.0, -200.0],
                              T=[-16.0, 0.0, 0.0])


def ydbdr_node(rgb):
    """YDbDr of an HWC float node with RGB values in [0, 1] (a linear map)."""
    return fn.coord_transform(rgb, M=YDBDR_FROM_RGB)


def convert_node(rgb, space: str):
    if space == "lab":
        return lab_node(rgb)
    if space == "ydbdr":
        return ydbdr_node(rgb)
    raise ValueError(f"unknown colour space {space!r} (choose from {', '.join(SPACES)})")


def normalize_node(converted, space: str):
    """CMC's per-channel normalisation, HWC float in, CHW float out."""
    mean, std = (LAB_MEAN, LAB_STD) if space == "lab" else (YDBDR_MEAN, YDBDR_STD)
    return fn.crop_mirror_normalize(converted, dtype=types.FLOAT, output_layout="CHW",
                                    mean=list(mean), std=list(std))


def convert(images_uint8_nhwc: np.ndarray, space: str, num_threads: int = 1) -> np.ndarray:
    """Run the DALI conversion on the CPU: uint8 [N, H, W, 3] RGB → float32 [N, H, W, 3] in `space`
    (before normalisation)."""
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] RGB images, got {images.dtype} {list(images.shape)}")
    if space not in SPACES:
        raise ValueError(f"unknown colour space {space!r} (choose from {', '.join(SPACES)})")

    @pipeline_def(batch_size=len(images), num_threads=num_threads, device_id=None)
    def graph():
        rgb = fn.external_source(source=lambda: list(images), layout="HWC", batch=True)
        return convert_node(fn.cast(rgb, dtype=types.FLOAT) / 255.0, space)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return np.stack([np.array(out[i]) for i in range(len(images))]).astype(np.float32)
