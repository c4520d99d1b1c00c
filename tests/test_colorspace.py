"""pipeline.colorspace: DALI Lab / YDbDr against scikit-image's reference conversions on real photos."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import color, data

from pipeline.colorspace import LAB_MEAN, LAB_STD, YDBDR_MEAN, YDBDR_STD, convert, convert_node, normalize_node


def photos():
    # real photos cropped to one size; extremes (pure black/white, saturated) included
    crops = [data.astronaut()[:256, :256], data.coffee()[:256, :256], data.chelsea()[:256, :256],
             data.rocket()[:256, :256]]
    extremes = np.zeros((256, 256, 3), np.uint8)
    extremes[:64] = 255
    extremes[64:128, :, 0] = 255
    extremes[128:192, :, 2] = 255
    extremes[192:] = np.arange(256, dtype=np.uint8)[None, :, None]  # a grey ramp through the sRGB knee
    return np.stack(crops + [extremes])


def test_lab_matches_skimage_rgb2lab_within_half_a_unit():
    images = photos()
    ours = convert(images, "lab")
    reference = np.stack([color.rgb2lab(image) for image in images])
    assert np.abs(ours - reference).max() < 0.5


def test_ydbdr_matches_skimage_rgb2ydbdr_within_1e_3():
    images = photos()
    ours = convert(images, "ydbdr")
    reference = np.stack([color.rgb2ydbdr(image) for image in images])
    assert np.abs(ours - reference).max() < 1e-3


@pytest.mark.parametrize("space, mean, std, reference", [
    ("lab", LAB_MEAN, LAB_STD, color.rgb2lab),
    ("ydbdr", YDBDR_MEAN, YDBDR_STD, color.rgb2ydbdr),
])
def test_cmc_normalisation_gives_chw_with_cmc_constants(space, mean, std, reference):
    from nvidia.dali import fn, pipeline_def, types
    images = photos()[:2]

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def graph():
        rgb = fn.external_source(source=lambda: list(images), layout="HWC", batch=True)
        return normalize_node(convert_node(fn.cast(rgb, dtype=types.FLOAT) / 255.0, space), space)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    for i in range(2):
        expected = ((reference(images[i]) - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
        np.testing.assert_allclose(np.array(out[i]), expected, atol=1e-2)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="uint8"):
        convert(np.zeros((1, 4, 4, 3), np.float32), "lab")
    with pytest.raises(ValueError, match="colour space"):
        convert(np.zeros((1, 4, 4, 3), np.uint8), "hsv")
