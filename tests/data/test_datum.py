"""caffe_alex.data.datum: Datum <-> numpy, images decoded/encoded as Caffe's OpenCV calls do."""

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from caffe_alex.data.datum import (
    ImageError,
    array_to_datum,
    datum_to_array,
    decode_image,
    encode_image,
    encoded_datum,
    load_image,
    parse_datum,
    resize_linear,
)
from caffe_alex.errors import CaffeAlexError

RNG = np.random.default_rng(0)


def _bgr(c=3, h=5, w=7):
    return RNG.integers(0, 256, (c, h, w), dtype=np.uint8)


def test_raw_round_trip_keeps_layout():
    a = _bgr()
    datum = parse_datum(array_to_datum(a, label=7).SerializeToString())
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 5, 7, 7)
    assert datum.data == a.tobytes()  # C x H x W, channel-major as CVMatToDatum writes it
    assert np.array_equal(datum_to_array(datum), a)


def test_float_data_round_trip():
    a = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    datum = array_to_datum(a, 1)
    assert not datum.data and len(datum.float_data) == 24
    out = datum_to_array(datum.SerializeToString())
    assert out.dtype == np.float32 and np.array_equal(out, a)


def test_bad_records_name_their_key():
    with pytest.raises(CaffeAlexError, match="record '00000042_a.jpg' is not a Datum"):
        parse_datum(b"\xff\xff\xff", key=b"00000042_a.jpg")
    short = array_to_datum(_bgr())
    short.data = short.data[:-1]
    with pytest.raises(
        CaffeAlexError, match=r"record 'k7': 104 bytes of data for shape \(3, 5, 7\)"
    ):
        datum_to_array(short, key="k7")
    with pytest.raises(ImageError, match="record 'bad'"):
        datum_to_array(encoded_datum(b"not an image"), key="bad")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_encoded_is_bgr_like_opencv(fmt):
    a = _bgr(h=16, w=24)
    data = encode_image(a, fmt)
    ours = datum_to_array(encoded_datum(data, 3))
    theirs = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).transpose(2, 0, 1)
    assert ours.shape == (3, 16, 24) and np.array_equal(ours, theirs)
    if fmt == "png":
        assert np.array_equal(ours, a)  # lossless, and the channel order survives
    gray = datum_to_array(encoded_datum(data), force_gray=True)
    cv_gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert gray.shape == (1, 16, 24) and np.abs(gray[0].astype(int) - cv_gray).max() <= 1


def test_pure_colours_land_in_bgr_planes():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # red in Pillow's RGB
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    chw = decode_image(buf.getvalue())
    assert chw[2].min() == 255 and chw[:2].max() == 0  # red is the last plane, as in OpenCV


def test_native_channels_and_forcing():
    gray = encode_image(_bgr(c=1, h=6, w=6), "png")
    assert decode_image(gray).shape == (1, 6, 6)
    assert decode_image(gray, color=True).shape == (3, 6, 6)
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (6, 6, 4), dtype=np.uint8), "RGBA").save(buf, "PNG")
    ours = decode_image(buf.getvalue())
    theirs = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(ours, theirs.transpose(2, 0, 1))  # BGRA
    assert decode_image(buf.getvalue(), color=True).shape == (3, 6, 6)


@pytest.mark.parametrize(
    "src, dst",
    [
        ((28, 28), (227, 227)),
        ((100, 80), (37, 53)),
        ((64, 64), (32, 32)),
        ((5, 7), (9, 3)),
        ((375, 500), (256, 256)),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_resize_matches_opencv_bilinear(src, dst, channels):
    a = _bgr(channels, *src)
    ours = resize_linear(a, *dst)
    hwc = a.transpose(1, 2, 0) if channels == 3 else a[0]
    theirs = cv2.resize(hwc, dst[::-1], interpolation=cv2.INTER_LINEAR)
    theirs = theirs.transpose(2, 0, 1) if channels == 3 else theirs[None]
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02


def test_load_image_like_imread(tmp_path):
    a = _bgr(h=20, w=30)
    path = tmp_path / "im age.png"
    path.write_bytes(encode_image(a, "png"))
    assert np.array_equal(load_image(str(path)), a)
    # OpenCV's grey conversion depends on the decoder (libpng's, libjpeg's, cvtColor's):
    # Pillow's ITU-R 601 conversion is within one grey level of each.
    gray = load_image(str(path), False)[0].astype(int)
    assert np.abs(gray - cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)).max() <= 1
    resized = load_image(str(path), True, 10, 12)
    assert resized.shape == (3, 10, 12)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageError, match="broken.jpg"):
        load_image(str(tmp_path / "broken.jpg"))


def test_encode_rejects_unknown_format():
    with pytest.raises(CaffeAlexError, match="bmpx"):
        encode_image(_bgr(), "bmpx")
