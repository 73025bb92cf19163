"""caffe_alex.data.datum: Datum <-> numpy; images decoded, resized and encoded equal to
OpenCV's own calls with Caffe's flags (cv2 is the reference, compared exactly)."""

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


def _cv_chw(image):
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)


def _cv_decode(data, flag):
    return _cv_chw(cv2.imdecode(np.frombuffer(data, np.uint8), flag))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_encoded_equals_opencv(fmt):
    a = _bgr(h=16, w=24)
    data = encode_image(a, fmt)
    _, theirs = cv2.imencode("." + fmt, a.transpose(1, 2, 0).copy())
    assert data == theirs.tobytes()  # cv::imencode's bytes, default quality
    ours = datum_to_array(encoded_datum(data, 3))
    assert ours.shape == (3, 16, 24)
    assert np.array_equal(ours, _cv_decode(data, cv2.IMREAD_UNCHANGED))
    if fmt == "png":
        assert np.array_equal(ours, a)  # lossless, and the channel order survives
    gray = datum_to_array(encoded_datum(data), force_gray=True)
    assert np.array_equal(gray, _cv_decode(data, cv2.IMREAD_GRAYSCALE))
    color = datum_to_array(encoded_datum(data), force_color=True)
    assert np.array_equal(color, _cv_decode(data, cv2.IMREAD_COLOR))


def test_pure_colours_land_in_bgr_planes():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # red in Pillow's RGB
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    chw = decode_image(buf.getvalue())
    assert chw[2].min() == 255 and chw[:2].max() == 0  # red is the last plane, as in OpenCV


def _png(array, mode):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode, shape, native",
    [
        ("L", (6, 6), 1),
        ("RGB", (6, 6, 3), 3),
        ("RGBA", (6, 6, 4), 4),  # BGRA
        ("LA", (6, 6, 2), 4),  # OpenCV expands grey + alpha to BGRA
    ],
)
def test_native_channels_and_forcing_as_opencv(mode, shape, native):
    data = _png(RNG.integers(0, 256, shape, dtype=np.uint8), mode)
    for color, flag, channels in [
        (None, cv2.IMREAD_UNCHANGED, native),
        (True, cv2.IMREAD_COLOR, 3),
        (False, cv2.IMREAD_GRAYSCALE, 1),
    ]:
        ours = decode_image(data, color)
        assert ours.shape == (channels, 6, 6)
        assert np.array_equal(ours, _cv_decode(data, flag))


def test_16_bit_images_as_caffe_reads_them():
    _, data = cv2.imencode(".png", RNG.integers(0, 65536, (5, 7, 3), dtype=np.uint16))
    data = data.tobytes()
    # cv::imdecode(-1) keeps 16 bits, which Caffe's DataTransformer refuses
    with pytest.raises(ImageError, match="record 'k'.*uint16.*8-bit"):
        datum_to_array(encoded_datum(data), key="k")
    # in colour or grey OpenCV converts to 8 bits, and so do we
    assert np.array_equal(decode_image(data, True), _cv_decode(data, cv2.IMREAD_COLOR))
    assert np.array_equal(decode_image(data, False), _cv_decode(data, cv2.IMREAD_GRAYSCALE))


def test_exif_orientation_where_opencv_applies_it(tmp_path):
    image = Image.fromarray(RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    # OpenCV 4 turns the image upright in colour and grey, and not with IMREAD_UNCHANGED
    assert decode_image(data).shape == (3, 6, 10)
    assert decode_image(data, True).shape == (3, 10, 6)
    assert np.array_equal(decode_image(data, True), _cv_decode(data, cv2.IMREAD_COLOR))
    assert np.array_equal(load_image(str(path)), _cv_chw(cv2.imread(str(path))))
    gray = _cv_chw(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    assert gray.shape == (1, 10, 6) and np.array_equal(load_image(str(path), False), gray)


@pytest.mark.parametrize(
    "src, dst",
    [
        ((28, 28), (227, 227)),
        ((100, 80), (37, 53)),
        ((64, 64), (32, 32)),
        ((5, 7), (9, 3)),
        ((375, 500), (256, 256)),
        ((300, 200), (300, 200)),
    ],
)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_resize_equals_opencv_bilinear(src, dst, channels):
    a = _bgr(channels, *src)
    ours = resize_linear(a, *dst)
    hwc = a.transpose(1, 2, 0).copy() if channels > 1 else a[0]
    theirs = cv2.resize(hwc, dst[::-1], interpolation=cv2.INTER_LINEAR)
    assert ours.shape == (channels, *dst) and np.array_equal(ours, _cv_chw(theirs))
    view = a[:, 1:-1, 2:]  # a window of a larger image, as WindowData resizes
    theirs = cv2.resize(view.transpose(1, 2, 0).copy(), dst[::-1])
    assert np.array_equal(resize_linear(view, *dst), _cv_chw(theirs).reshape(channels, *dst))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_load_image_equals_imread(tmp_path, fmt):
    path = tmp_path / f"im age.{fmt}"
    path.write_bytes(encode_image(_bgr(h=20, w=30), fmt))
    for color, flag in [(True, cv2.IMREAD_COLOR), (False, cv2.IMREAD_GRAYSCALE)]:
        want = _cv_chw(cv2.imread(str(path), flag))
        assert np.array_equal(load_image(str(path), color), want)
        resized = cv2.resize(cv2.imread(str(path), flag), (12, 10))
        assert np.array_equal(load_image(str(path), color, 10, 12), _cv_chw(resized))
    assert load_image(str(path), True, 10, 0).shape == (3, 20, 30)  # both sizes or none


def test_unreadable_images_are_one_line_errors(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="cannot decode image '.*broken.png'"):
        load_image(str(tmp_path / "broken.png"))
    with pytest.raises(ImageError, match="cannot read image '.*gone.png': no such file"):
        load_image(str(tmp_path / "gone.png"))
    with pytest.raises(ImageError, match="cannot decode record 'e'"):
        datum_to_array(encoded_datum(b""), key="e")


def test_encode_rejects_unknown_format():
    with pytest.raises(CaffeAlexError, match="bmpx"):
        encode_image(_bgr(), "bmpx")
    assert encode_image(_bgr(), "bmp")[:2] == b"BM"  # any format OpenCV writes, as Caffe
