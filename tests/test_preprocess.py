"""Preprocessing: vdsp / process_ops parsing, every numeric step against an independent reference
(straight numpy / cv2, Pillow, torch) on real photos, and image decoding of bad files."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tvmzoo.errors import ConfigError, ImageError
from tvmzoo.preprocess import (
    Preprocessing, apply, batch, normalize, read_image, resize_and_crop_uint8, resize_pillow, resized_size,
)

SHARED = Path(__file__).parents[1].parent / "shared" / "data"
SAMPLE = SHARED / "imagenet-sample"

VDSP_NEW = {
    "OpType": "FUSION_OP_RGB_RESIZE_CVTCOLOR_CROP_NORM_TENSOR",
    "OpConfig": {
        "IimageFormat": "RGB_PLANAR", "IimageWidth": 256, "IimageHeight": 256,
        "OimageWidth": 224, "OimageHeight": 224, "CropX": 16, "CropY": 16,
        "ResizeWidth": 256, "ResizeHeight": 256, "IimageWidthPitch": 256, "IimageHeightPitch": 256,
        "Mean": [0.485107421875, 0.4560546875, 0.406005859375],
        "Std": [0.22900390625, 0.2239990234375, 0.2249755859375],
        "NormaType": "DIV255_MINUSMEAN_DIVSTD", "ColorCvtCode": "NO_CHANGE", "ResizeType": "BILINEAR_CV",
    },
}


def _legacy(norma="DIV255_MINUSMEAN_DIVSTD", **extra):
    props = {"iimage_format": "RGB_PLANAR", "iimage_width": 256, "iimage_height": 256,
             "short_edge_threshold": 256, "crop_size": 224,
             "meanr": 14275, "meang": 14156, "meanb": 13951, "stdr": 13140, "stdg": 13099, "stdb": 13107,
             "norma_type": norma, "resize_type": "BILINEAR_CV", "color_cvt_code": "NO_CHANGE", "color_space": 0}
    props.update(extra)
    return {"vdsp_op_type": "RGB_RESIZE_CVTCOLOR_CROP_NORMALIZATION_TENSORIZATION_U8",
            "config": [{"Property": k, "DType": "UINT_16" if k[:4] in ("mean", "stdr", "stdg", "stdb") else "INT",
                        "ParamType": "SCALAR", "Value": v} for k, v in props.items()]}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    paths = sorted(SAMPLE.glob("*.JPEG"))[:4]
    assert len(paths) == 4, f"needs the shared sample photos in {SAMPLE}"
    return [read_image(p) for p in paths]


# ---- vdsp parsing ----
def test_vdsp_new_form(tmp_path):
    path = tmp_path / "official-repvgg_a0-vdsp_params.json"
    path.write_text(json.dumps(VDSP_NEW))
    pre = Preprocessing.from_vdsp(path)
    assert pre.resize_hw == (256, 256) and not pre.keep_aspect and pre.crop_hw == (224, 224)
    assert pre.crop_xy is None  # (16, 16) is the centre of 256 -> 224
    assert pre.norm == "DIV255_MINUSMEAN_DIVSTD" and pre.rgb and pre.interpolation == "BILINEAR_CV"
    assert pre.mean == (0.485107421875, 0.4560546875, 0.406005859375)
    assert Preprocessing.from_vdsp(pre.to_vdsp()) == pre


def test_vdsp_legacy_list_form_fp16_bits():
    pre = Preprocessing.from_vdsp(_legacy())
    # 14275 is the fp16 bit pattern of 0.485 (rounded to fp16: 0.485107421875)
    assert pre.mean == pytest.approx((0.485107421875, 0.4560546875, 0.406005859375), abs=0)
    assert pre.std == pytest.approx((0.22900390625, 0.2239990234375, 0.2249755859375), abs=0)
    assert pre.mean[0] == pytest.approx(0.485, abs=2e-4)
    assert pre.keep_aspect and pre.resize_hw == (256, 256) and pre.crop_hw == (224, 224) and pre.rgb
    # the new form of the same file gives the same preprocessing, but for keep-aspect
    assert Preprocessing.from_vdsp(VDSP_NEW) == Preprocessing(**{**pre.__dict__, "keep_aspect": False})


def test_vdsp_legacy_flat_numeric_form():
    flat = {"vdsp_op_type": 300, "iimage_format": 5000, "iimage_width": 288, "iimage_height": 288,
            "short_edge_threshold": 288, "resize_type": 1, "color_cvt_code": 2, "color_space": 0,
            "crop_size": 256, "meanr": 22459, "meang": 22340, "meanb": 22136,
            "stdr": 21325, "stdg": 21284, "stdb": 21292, "norma_type": 3}
    pre = Preprocessing.from_vdsp(flat)
    assert pre.norm == "MINUSMEAN_DIVSTD" and pre.crop_hw == (256, 256) and pre.resize_hw == (288, 288)
    assert pre.mean == pytest.approx((123.675, 116.28, 103.53), abs=0.07)
    assert pre.std == pytest.approx((58.395, 57.12, 57.375), abs=0.04)
    with pytest.raises(ConfigError, match="resize_type.*write the name"):
        Preprocessing.from_vdsp({**flat, "resize_type": 7})


@pytest.mark.parametrize("norm", ["NORMAL_EQUAL", "MINUSMEAN_DIVSTD", "DIV255_MINUSMEAN_DIVSTD",
                                  "DIV127_5_MINUSONE", "DIV255"])
@pytest.mark.parametrize("resize", ["BILINEAR_CV", "BILINEAR", "BILINEAR_PILLOW", "NEAREST", "BICUBIC"])
def test_vdsp_every_type_round_trips(norm, resize):
    cfg = {**VDSP_NEW["OpConfig"], "NormaType": norm, "ResizeType": resize}
    pre = Preprocessing.from_vdsp({**VDSP_NEW, "OpConfig": cfg})
    assert (pre.norm, pre.interpolation) == (norm, resize)
    assert Preprocessing.from_vdsp(pre.to_vdsp()) == pre
    legacy = Preprocessing.from_vdsp(_legacy(norm, resize_type=resize))
    assert (legacy.norm, legacy.interpolation) == (norm, resize)


def test_vdsp_crop_offset_and_colour():
    cfg = {**VDSP_NEW["OpConfig"], "CropX": 0, "CropY": 32, "IimageFormat": "BGR888", "ColorCvtCode": "BGR2RGB"}
    pre = Preprocessing.from_vdsp({**VDSP_NEW, "OpConfig": cfg})
    assert pre.crop_xy == (0, 32) and pre.rgb
    assert Preprocessing.from_vdsp(pre.to_vdsp()) == pre
    bgr = Preprocessing.from_vdsp({**VDSP_NEW, "OpConfig": {**cfg, "ColorCvtCode": "NO_CHANGE"}})
    assert not bgr.rgb and Preprocessing.from_vdsp(bgr.to_vdsp()) == bgr


def test_vdsp_keep_aspect_extension():
    cfg = {**VDSP_NEW["OpConfig"], "ResizeKeepAspect": True}
    pre = Preprocessing.from_vdsp({**VDSP_NEW, "OpConfig": cfg})
    assert pre.keep_aspect and pre.crop_xy is None
    out = pre.to_vdsp()
    assert out["OpConfig"]["ResizeKeepAspect"] is True and Preprocessing.from_vdsp(out) == pre
    with pytest.raises(ConfigError, match="ResizeWidth 256 != ResizeHeight 300"):
        Preprocessing.from_vdsp({**VDSP_NEW, "OpConfig": {**cfg, "ResizeHeight": 300}})


def test_vdsp_resize_only_op():
    cfg = {k: v for k, v in VDSP_NEW["OpConfig"].items() if not k.startswith(("Crop", "Resize"))}
    pre = Preprocessing.from_vdsp({"OpType": "FUSION_OP_RGB_RESIZE_CVTCOLOR_NORM_TENSOR", "OpConfig": cfg})
    assert pre.resize_hw == pre.crop_hw == (224, 224) and pre.interpolation == "BILINEAR_CV"


@pytest.mark.parametrize("change, message", [
    ({"NormaType": "DIV255_MINUSMEAN"}, "Did you mean 'DIV255_MINUSMEAN_DIVSTD'"),
    ({"ResizeType": "BILINEAR_PIL"}, "Did you mean 'BILINEAR_PILLOW'"),
    ({"ColorCvtCode": "YUV2RGB"}, "ColorCvtCode"),
    ({"OimageWidth": 300}, "crop 300x224 .*does not fit"),
    ({"CropX": 40}, r"crop 224x224 at \(40, 16\) does not fit"),
    ({"OimageHeight": 0}, "positive"),
    ({"Mean": [0.4, 0.5]}, "three finite numbers"),
    ({"Std": [0.2, 0.0, 0.2]}, "std must be positive"),
    ({"OimageWidth": "224"}, "'OimageWidth' must be an integer"),
])
@pytest.mark.reliability
def test_vdsp_bad_values(change, message):
    with pytest.raises(ConfigError, match=message):
        Preprocessing.from_vdsp({**VDSP_NEW, "OpConfig": {**VDSP_NEW["OpConfig"], **change}})


@pytest.mark.reliability
def test_vdsp_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Preprocessing.from_vdsp(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"OpType": "X",\n "OpConfig": {,}}')
    with pytest.raises(ConfigError, match=r"broken.json: invalid JSON at line 2"):
        Preprocessing.from_vdsp(broken)
    with pytest.raises(ConfigError, match="not a vdsp params file"):
        Preprocessing.from_vdsp({"foo": 1})
    with pytest.raises(ConfigError, match="OpType 'FUSION_OP_YUV_NV12"):
        Preprocessing.from_vdsp({"OpType": "FUSION_OP_YUV_NV12_RESIZE", "OpConfig": {}})


# ---- process_ops ----
VENDOR_OPS = [
    {"type": "DecodeImage"},
    {"type": "Resize", "size": [256, 256]},
    {"type": "CenterCrop", "crop_size": [224, 224]},
    {"type": "Normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    {"type": "ToTensor"},
]


def test_process_ops_vendor_example():
    assert Preprocessing.from_process_ops(VENDOR_OPS) == Preprocessing()


def test_process_ops_variants():
    ops = [{"type": "Resize", "resize_short": 256}, {"type": "CenterCrop", "crop_size": 224},
           {"type": "Normalize", "div255": True, "mean": [0, 0, 0], "std": [1, 1, 1]}]
    pre = Preprocessing.from_process_ops(ops)
    assert pre.keep_aspect and pre.short_side == 256 and pre.crop_hw == (224, 224) and pre.norm == "DIV255"
    plain = Preprocessing.from_process_ops([{"type": "Resize", "size": [224, 224]},
                                            {"type": "Normalize", "mean": [123.675, 116.28, 103.53],
                                             "std": [58.395, 57.12, 57.375]}])
    assert plain.norm == "MINUSMEAN_DIVSTD" and plain.crop_hw == (224, 224)


@pytest.mark.parametrize("ops, message", [
    ([{"type": "CustomFunc", "module_path": "x.py", "func_name": "f"}], r"process_ops\[0\] \(CustomFunc\): not supported, because"),
    ([{"type": "Resise", "size": [256, 256]}], "Did you mean 'Resize'"),
    ([{"type": "Resize", "size": [256, 256]}, {"type": "CenterCrop", "crop_size": [300, 300]}], "does not fit"),
    ([{"type": "Resize", "resize_short": 256}], "add a CenterCrop"),
    ([{"type": "CenterCrop", "crop_size": [224, 224]}], "no Resize step"),
    ([{"type": "Resize", "size": [256, 256], "interp": 1}], r"\[0\] \(Resize\): unexpected keys \['interp'\]"),
    ([{"type": "Resize", "size": [256, 256]}, {"type": "Normalize", "mean": [0.5], "std": [1, 1, 1]}], "three"),
    ([{"type": "Resize", "size": [-1, 256]}], "positive"),
    ([], "non-empty list"),
    (["Resize"], "mapping with a 'type' key"),
])
@pytest.mark.reliability
def test_process_ops_errors(ops, message):
    with pytest.raises(ConfigError, match=message):
        Preprocessing.from_process_ops(ops)


# ---- numerics ----
def _reference(pre: Preprocessing, bgr: np.ndarray) -> np.ndarray:
    """A deliberately plain re-implementation: cv2 resize, slicing, the textbook formulas."""
    h, w = bgr.shape[:2]
    if pre.keep_aspect:
        s = pre.short_side
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)   # (width, height), as cv2 takes it
    else:
        size = pre.resize_hw[::-1]
    img = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    ch, cw = pre.crop_hw
    x0 = (size[0] - cw) // 2 if pre.crop_xy is None else pre.crop_xy[0]
    y0 = (size[1] - ch) // 2 if pre.crop_xy is None else pre.crop_xy[1]
    img = img[y0:y0 + ch, x0:x0 + cw]
    if pre.rgb:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    x = img.astype(np.float64)
    mean, std = np.array(pre.mean), np.array(pre.std)
    x = {"NORMAL_EQUAL": lambda: x, "MINUSMEAN_DIVSTD": lambda: (x - mean) / std,
         "DIV255_MINUSMEAN_DIVSTD": lambda: (x / 255.0 - mean) / std,
         "DIV127_5_MINUSONE": lambda: x / 127.5 - 1.0, "DIV255": lambda: x / 255.0}[pre.norm]()
    return x.transpose(2, 0, 1)


@pytest.mark.parametrize("pre", [
    Preprocessing(),
    Preprocessing(keep_aspect=True, crop_hw=(200, 224), rgb=False),
    Preprocessing(resize_hw=(280, 300), crop_hw=(224, 224), crop_xy=(70, 3), norm="MINUSMEAN_DIVSTD",
                  mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)),
    Preprocessing(norm="NORMAL_EQUAL"), Preprocessing(norm="DIV127_5_MINUSONE"), Preprocessing(norm="DIV255"),
], ids=["vendor", "keep-aspect-bgr", "offset-crop-255", "equal", "div127", "div255"])
def test_apply_matches_reference_on_photos(pre, photos):
    for bgr in photos:
        out = apply(pre, bgr)
        assert out.dtype == np.float32 and out.shape == (3, *pre.crop_hw)
        np.testing.assert_allclose(out, _reference(pre, bgr), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out, normalize(pre, resize_and_crop_uint8(pre, bgr)))


def test_every_norm_type_numerically():
    pixel = np.array([[[0, 127, 255]]], np.uint8)  # one pixel, network order
    mean, std = (0.5, 10.0, 100.0), (2.0, 4.0, 8.0)
    expect = {
        "NORMAL_EQUAL": [0, 127, 255],
        "MINUSMEAN_DIVSTD": [(0 - 0.5) / 2, (127 - 10) / 4, (255 - 100) / 8],
        "DIV255_MINUSMEAN_DIVSTD": [(0 - 0.5) / 2, (127 / 255 - 10) / 4, (1 - 100) / 8],
        "DIV127_5_MINUSONE": [-1, 127 / 127.5 - 1, 1],
        "DIV255": [0, 127 / 255, 1],
    }
    for norm, values in expect.items():
        out = normalize(Preprocessing(norm=norm, mean=mean, std=std), pixel)
        np.testing.assert_allclose(out[:, 0, 0], values, rtol=1e-6, atol=1e-6, err_msg=norm)


def test_crop_offsets_pick_the_right_pixels():
    # A gradient image: the value at (y, x) encodes the position, so the crop offset is visible.
    ys, xs = np.mgrid[0:256, 0:256]
    img = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)  # B = x, G = y
    pre = Preprocessing(resize_hw=(256, 256), crop_hw=(20, 10), crop_xy=(30, 40), rgb=False, norm="NORMAL_EQUAL")
    out = resize_and_crop_uint8(pre, img)
    assert out.shape == (20, 10, 3) and out[0, 0, 0] == 30 and out[0, 0, 1] == 40 and out[-1, -1, 0] == 39
    centred = resize_and_crop_uint8(Preprocessing(resize_hw=(256, 256), crop_hw=(223, 224), rgb=False), img)
    assert centred[0, 0, 0] == 16 and centred[0, 0, 1] == 16  # (256 - 223) // 2 = 16
    rgb = resize_and_crop_uint8(Preprocessing(resize_hw=(256, 256), crop_hw=(20, 10), crop_xy=(30, 40)), img)
    np.testing.assert_array_equal(rgb, out[:, :, ::-1])


def test_keep_aspect_resize_sizes(photos):
    pre = Preprocessing(keep_aspect=True)
    assert resized_size(pre, 500, 375) == (341, 256)  # torchvision: int(256 * 500 / 375)
    assert resized_size(pre, 375, 500) == (256, 341)
    assert resized_size(pre, 256, 256) == (256, 256)
    assert resized_size(Preprocessing(), 500, 375) == (256, 256)
    for bgr in photos:
        assert apply(pre, bgr).shape == (3, 224, 224)


def test_keep_aspect_matches_torchvision_style_resize(photos):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    pre = Preprocessing(keep_aspect=True, interpolation="BILINEAR_PILLOW")
    for bgr in photos[:2]:
        h, w = bgr.shape[:2]
        size = resized_size(pre, w, h)
        t = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None]
        ref = F.interpolate(t, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)
        ref = ref[0].numpy().transpose(1, 2, 0)
        top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
        ref = ref[top:top + 224, left:left + 224, ::-1]
        diff = np.abs(resize_and_crop_uint8(pre, bgr).astype(int) - ref.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05  # torch's uint8 path mirrors Pillow's fixed point


@pytest.mark.parametrize("size", [(256, 256), (341, 256), (224, 300), (900, 700), (17, 5)])
def test_pillow_resize_is_bit_exact(size):
    Image = pytest.importorskip("PIL.Image")
    path = sorted(SAMPLE.glob("*.JPEG"))[0]
    rgb = np.asarray(Image.open(path).convert("RGB"))
    expected = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    np.testing.assert_array_equal(resize_pillow(rgb, size), expected)


def test_bilinear_pillow_differs_from_cv_when_downscaling(photos):
    cv = resize_and_crop_uint8(Preprocessing(), photos[0]).astype(int)
    pil = resize_and_crop_uint8(Preprocessing(interpolation="BILINEAR_PILLOW"), photos[0]).astype(int)
    assert 0 < np.abs(cv - pil).mean() < 10


def test_batch(photos):
    pre = Preprocessing()
    out = batch(pre, photos[:3])
    assert out.shape == (3, 3, 224, 224) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], apply(pre, photos[1]))
    with pytest.raises(ImageError):
        batch(pre, [])
    with pytest.raises(ImageError, match="HxWx3 uint8"):
        apply(pre, photos[0].astype(np.float32))


# ---- decoding ----
@pytest.mark.reliability
def test_read_image_matches_imread_and_handles_odd_paths(tmp_path):
    src = next(p for p in sorted(SAMPLE.glob("*.JPEG")) if "'" in p.name)  # yellow_lady's_slipper
    expected = cv2.imread(str(src), cv2.IMREAD_COLOR)
    got = read_image(src)  # an apostrophe in the name
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    odd = tmp_path / "日本語 フォルダ" / "ça va's.JPEG"
    odd.parent.mkdir()
    odd.write_bytes(src.read_bytes())
    np.testing.assert_array_equal(read_image(odd), expected)


@pytest.mark.reliability
def test_read_image_grayscale_rgba_16bit(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    out = read_image(tmp_path / "rgba.png")
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgba[:, :, :3])  # alpha dropped, colour untouched
    deep = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    out = read_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - (deep >> 8)).max() <= 1


@pytest.mark.reliability
def test_read_image_exif_orientation(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)  # a red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=95)
    out = read_image(path)
    assert out.shape == (40, 20, 3)  # turned upright, as cv2.imread(IMREAD_COLOR) does
    np.testing.assert_array_equal(out, cv2.imread(str(path), cv2.IMREAD_COLOR))


@pytest.mark.reliability
def test_read_image_corrupt_files(tmp_path):
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"cannot decode .*empty.JPEG: the file is empty"):
        read_image(empty)
    text = tmp_path / "notes.JPEG"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"cannot decode .*notes.JPEG: not a supported image"):
        read_image(text)
    data = (SAMPLE / "n01440764_tench.JPEG").read_bytes()
    for cut in (0.3, 0.9, len(data) - 2):
        short = tmp_path / "truncated.JPEG"
        short.write_bytes(data[:int(cut * len(data)) if cut < 1 else cut])
        with pytest.raises(ImageError, match="cannot decode .*truncated.JPEG"):
            read_image(short)
    with pytest.raises(ImageError, match="does not exist"):
        read_image(tmp_path / "missing.jpg")


@pytest.mark.reliability
def test_read_image_pixel_limit(tmp_path):
    img = np.zeros((300, 400, 3), np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".webp"):
        path = tmp_path / f"big{ext}"
        cv2.imwrite(str(path), img)
        assert read_image(path).shape == (300, 400, 3)
        with pytest.raises(ImageError, match=r"400x300 pixels is above the limit of 100000 pixels"):
            read_image(path, max_pixels=100_000)
