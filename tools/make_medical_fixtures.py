#!/usr/bin/env python3
"""Build the medical-image fixtures that tests/suite/medical.rs compares medvlm against.

The expected pictures come from the Python reference stack (pydicom, nibabel, numpy, Pillow,
GDCM for the one file pydicom cannot decode); nothing is computed by medvlm. CI never runs this
script: its small outputs are committed under tests/fixtures/medical/.

    /work/pyenv/bin/pip install pydicom==3.0.2 nibabel==5.4.2 numpy pillow \\
        python-gdcm pylibjpeg pylibjpeg-libjpeg
    /work/pyenv/bin/python tools/make_medical_fixtures.py [--shared DIR]

DIR (default: ../shared/data/medical-files beside the repository) holds the real test files
(CT_small.dcm, MR_small.dcm, MR_small_RLE.dcm, JPEG-lossy.dcm, examples_ybr_color.dcm,
anatomical.nii, example4d.nii.gz). They are copied into tests/fixtures/medical/, except
example4d.nii.gz (346 KB), whose expected picture is committed but which the test reads from the
shared folder only when it exists; a cropped copy (small4d.nii.gz) stands in for it.

What it writes, all under tests/fixtures/medical/:
  *.dcm, *.nii, *.nii.gz   the copied real files
  synthetic/               small files made here for the cases the real ones lack
                           (MONOCHROME1, multi-frame, signed 12-bit with junk high bits, YBR_FULL
                           and YBR_FULL_422, planar RGB, RLE colour, 8-bit JPEG grey and colour,
                           SIGMOID / LINEAR_EXACT VOI functions, deflate, no preamble, no file
                           meta, an unsupported transfer syntax, scaled and NaN NIfTI, small 4D)
  expected/*.png           the expected 8-bit picture per case (L for grey, RGB for colour)
  manifest.json            per case: source, options, size, min/max/mean of the 8-bit picture,
                           the reference used; the rescaled (modality LUT) values' min/max/mean
                           of each grey case; the reference library versions

The 8-bit conversion (the same in src/processor/medical/window.rs):
  grey DICOM: values = pydicom apply_modality_lut(frame); then
    - a VOI window (MedicalOptions.window, LINEAR; else the file's first Window Center/Width with
      the file's VOI LUT Function): out = pydicom apply_windowing(values), and
      t = (out - y_min) / (y_max - y_min) with pydicom's own output range y_min..y_max, i.e.
      t = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1) for LINEAR (PS3.3 C.11.2.1.2.1);
    - no window: t = (x - min) / (max - min) over the frame (0 when max == min);
    then v = floor(t * 255 + 0.5) (round half up), and 255 - v for MONOCHROME1.
  colour DICOM: pydicom's RGB (as_rgb=True: YBR_FULL/YBR_FULL_422 through
    pydicom.pixels.processing.convert_color_space); 8-bit JPEG decoded with Pillow (libjpeg-turbo).
  NIfTI: values = np.asanyarray(img.dataobj) (nibabel applies scl_slope/scl_inter; slope 0 or
    NaN means none); slice = data[:, :, k, 0, ...] (k = middle of the third axis unless given,
    the first volume of 4D data); picture = np.flipud(slice.T) (rows: j from high to low, columns:
    i from low to high; for LAS- or RAS-stored axial data anterior is up); then the LINEAR window
    formula above or min..max of the slice's finite values; NaN -> 0.
"""

import argparse
import hashlib
import json
import shutil
import sys
import warnings
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import PIL
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.pixels.processing import apply_modality_lut, apply_windowing
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "medical"
SYN = OUT / "synthetic"
EXP = OUT / "expected"

REAL_COPIED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "JPEG-lossy.dcm",
    "examples_ybr_color.dcm",
    "anatomical.nii",
]


# ---------------------------------------------------------------------------------------------
# The 8-bit conversion


def to_u8(t):
    """t in [0, 1] (NaN -> 0) to 0..255, rounding half up."""
    t = np.nan_to_num(np.asarray(t, dtype=np.float64), nan=0.0)
    return np.floor(np.clip(t, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def minmax_unit(x):
    x = np.asarray(x, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros_like(x)
    lo, hi = finite.min(), finite.max()
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def linear_unit(x, c, w):
    """PS3.3 C.11.2.1.2.1 LINEAR, normalised to 0..1 (used for NIfTI; pydicom for DICOM)."""
    x = np.asarray(x, dtype=np.float64)
    c = float(c) - 0.5
    if w <= 1:
        return np.where(x <= c, 0.0, 1.0)
    w = float(w) - 1.0
    t = (x - c) / w + 0.5
    return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, t))


def pydicom_output_range(ds):
    """y_min, y_max exactly as pydicom 3.0's apply_windowing computes them."""
    if ds.get("ModalityLUTSequence"):
        y_min = 0
        y_max = 2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    elif ds.PixelRepresentation == 0:
        y_min = 0
        y_max = 2 ** ds.BitsStored - 1
    else:
        y_min = -(2 ** (ds.BitsStored - 1))
        y_max = 2 ** (ds.BitsStored - 1) - 1
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)
    return float(y_min), float(y_max)


# ---------------------------------------------------------------------------------------------
# References


def gdcm_decode(path):
    """Stored values of a single-frame grey file through GDCM (IJG libjpeg 6b, islow IDCT)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise RuntimeError(f"GDCM cannot read {path}")
    image = reader.GetImage()
    cols, rows = image.GetDimension(0), image.GetDimension(1)
    scalar = image.GetPixelFormat().GetScalarTypeAsString()
    dtype = {"UINT16": "<u2", "INT16": "<i2", "UINT8": "u1", "INT8": "i1"}[scalar]
    raw = image.GetBuffer().encode("utf-8", "surrogateescape")
    return np.frombuffer(raw, dtype=dtype).reshape(rows, cols)


def pylibjpeg_patched_se(ds):
    """JPEG-lossy.dcm through pylibjpeg-libjpeg after patching its SOS Se from 0 to 63 (the
    file's scan header is malformed; IJG/GDCM ignore Se in sequential mode, Richter's libjpeg
    refuses it). Only for the report: the alternative decoder's distance."""
    ds = ds.copy()
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sos = frame.find(b"\xff\xda")
    ns = frame[sos + 4]
    frame[sos + 5 + 2 * ns + 1] = 63
    ds.PixelData = encapsulate([bytes(frame)])
    return pixel_array(ds, decoding_plugin="pylibjpeg")


def dicom_reference(path, window=None, slice=None, plugin="", decode=None):
    """Expected 8-bit picture and (for grey) the rescaled values' stats."""
    data = Path(path).read_bytes()
    if data[:4] == b"DICM":
        data = b"\0" * 128 + data  # no preamble: pydicom wants one before "DICM"
    ds = pydicom.dcmread(BytesIO(data), force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    frames = int(ds.get("NumberOfFrames") or 1)
    index = frames // 2 if slice is None else slice
    if decode is not None:
        arr = decode(path)
    else:
        arr = pixel_array(ds, index=index, decoding_plugin=plugin)
    if int(ds.SamplesPerPixel) != 1:
        assert arr.dtype == np.uint8 and arr.ndim == 3, (path, arr.dtype, arr.shape)
        return arr, None
    values = apply_modality_lut(arr, ds).astype(np.float64)
    stats = {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }
    if window is not None:
        wds = ds.copy()
        wds.WindowCenter = window[0]
        wds.WindowWidth = window[1]
        if "VOILUTFunction" in wds:
            del wds.VOILUTFunction
        y_min, y_max = pydicom_output_range(wds)
        t = (apply_windowing(values.copy(), wds) - y_min) / (y_max - y_min)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        y_min, y_max = pydicom_output_range(ds)
        t = (apply_windowing(values.copy(), ds) - y_min) / (y_max - y_min)
    else:
        t = minmax_unit(values)
    out = to_u8(t)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 255 - out
    return out, stats


def nifti_reference(path, window=None, slice=None):
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    nz = data.shape[2] if data.ndim >= 3 else 1
    k = nz // 2 if slice is None else slice
    if data.ndim == 2:
        plane = data
    else:
        plane = data[(np.s_[:], np.s_[:], k) + (0,) * (data.ndim - 3)]
    values = np.flipud(plane.T).astype(np.float64)
    finite = values[np.isfinite(values)]
    stats = {
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(finite.mean()),
    }
    t = minmax_unit(values) if window is None else linear_unit(values, *window)
    return to_u8(t), stats


# ---------------------------------------------------------------------------------------------
# Synthetic files


def uid(name):
    return pydicom.uid.generate_uid(entropy_srcs=["medvlm-fixture", name])


def new_dataset(name, rows, cols, ts=ExplicitVRLittleEndian, **attrs):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid(name)
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = uid("implementation")
    ds = FileDataset(name, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "OT"
    ds.PatientName = "Fixture^Synthetic"
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def save(ds, name):
    path = SYN / name
    ds.save_as(path, enforce_file_format=True)
    return path


def pattern(rows, cols, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    return x, y, rng


def make_synthetic(real_dir):
    SYN.mkdir(parents=True, exist_ok=True)
    files = {}

    # MONOCHROME1, 12 of 16 bits, multi-valued window (the first pair applies).
    rows, cols = 24, 32
    x, y, rng = pattern(rows, cols, 1)
    arr = ((x * 120 + y * 10 + rng.integers(0, 40, (rows, cols))) % 4096).astype(np.uint16)
    ds = new_dataset(
        "mono1", rows, cols, BitsStored=12, HighBit=11, PhotometricInterpretation="MONOCHROME1"
    )
    ds.WindowCenter = [2000, 1000]
    ds.WindowWidth = [3000, 500]
    ds.PixelData = arr.tobytes()
    files["mono1"] = save(ds, "mono1.dcm")

    # Multi-frame, signed 12-bit in 16 with junk in the 4 unused high bits, rescaled, no window.
    frames, rows, cols = 5, 16, 20
    x, y, rng = pattern(rows, cols, 2)
    stack = np.stack(
        [((x * 37 + y * 53 + f * 411 + rng.integers(0, 64, (rows, cols))) % 4096) - 2048 for f in range(frames)]
    ).astype(np.int16)
    raw = (stack.astype(np.int32) & 0x0FFF) | 0x5000
    ds = new_dataset(
        "multiframe",
        rows,
        cols,
        BitsStored=12,
        HighBit=11,
        PixelRepresentation=1,
        NumberOfFrames=frames,
        RescaleSlope=2,
        RescaleIntercept=-100,
    )
    ds.PixelData = raw.astype(np.uint16).tobytes()
    files["multiframe"] = save(ds, "multiframe.dcm")

    # Colour test content: a frame of the real ultrasound clip, cropped.
    us = pixel_array(real_dir / "examples_ybr_color.dcm", index=15, decoding_plugin="pillow")
    crop = us[100:124, 150:182]  # 24 x 32 RGB
    ybr = pydicom.pixels.processing.convert_color_space(crop, "RGB", "YBR_FULL")

    # Uncompressed YBR_FULL_422 (pairs Y1 Y2 Cb Cr, chroma of the first pixel of each pair).
    rows, cols = crop.shape[:2]
    packed = np.empty((rows, cols // 2, 4), dtype=np.uint8)
    packed[..., 0] = ybr[:, 0::2, 0]
    packed[..., 1] = ybr[:, 1::2, 0]
    packed[..., 2] = ybr[:, 0::2, 1]
    packed[..., 3] = ybr[:, 0::2, 2]
    ds = new_dataset(
        "ybr422",
        rows,
        cols,
        SamplesPerPixel=3,
        PhotometricInterpretation="YBR_FULL_422",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    ds.PixelData = packed.tobytes()
    files["ybr422"] = save(ds, "ybr422.dcm")

    # Uncompressed RGB, planar configuration 1 (RRR... GGG... BBB...).
    ds = new_dataset(
        "rgb_planar",
        rows,
        cols,
        SamplesPerPixel=3,
        PhotometricInterpretation="RGB",
        PlanarConfiguration=1,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    ds.PixelData = np.ascontiguousarray(crop.transpose(2, 0, 1)).tobytes()
    files["rgb_planar"] = save(ds, "rgb_planar.dcm")

    # RLE Lossless, YBR_FULL (pydicom's own RLE encoder).
    ds = new_dataset(
        "rle_ybr",
        rows,
        cols,
        SamplesPerPixel=3,
        PhotometricInterpretation="YBR_FULL",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
    )
    ds.PixelData = np.ascontiguousarray(ybr).tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    files["rle_ybr"] = save(ds, "rle_ybr.dcm")

    # 8-bit JPEG baseline, grey (Pillow's libjpeg encoder).
    mr = pixel_array(real_dir / "MR_small.dcm").astype(np.float64)
    grey = np.clip((mr - mr.min()) / (mr.max() - mr.min()) * 255 + 0.5, 0, 255).astype(np.uint8)
    grey = grey[8:48, 4:60]  # 40 x 56
    jpeg = _jpeg_bytes(Image.fromarray(grey, "L"))
    ds = new_dataset(
        "jpeg8_grey",
        grey.shape[0],
        grey.shape[1],
        ts=JPEGBaseline8Bit,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        RescaleSlope=1.5,
        RescaleIntercept=-20,
    )
    ds.PixelData = encapsulate([jpeg])
    files["jpeg8_grey"] = save(ds, "jpeg8_grey.dcm")

    # 8-bit JPEG baseline, colour (JFIF, YCbCr 4:2:0) labelled YBR_FULL_422, and the same
    # stream mislabelled RGB (pydicom follows the JFIF marker: YBR).
    jpeg = _jpeg_bytes(Image.fromarray(crop, "RGB"))
    for name, pi in (("jpeg8_ybr", "YBR_FULL_422"), ("jpeg8_rgb_jfif", "RGB")):
        ds = new_dataset(
            name,
            rows,
            cols,
            ts=JPEGBaseline8Bit,
            SamplesPerPixel=3,
            PhotometricInterpretation=pi,
            PlanarConfiguration=0,
            BitsAllocated=8,
            BitsStored=8,
            HighBit=7,
        )
        ds.PixelData = encapsulate([jpeg])
        files[name] = save(ds, f"{name}.dcm")

    # Three JPEG frames, each split over two fragments, without a Basic Offset Table.
    frames = [_jpeg_bytes(Image.fromarray(np.ascontiguousarray(f), "RGB")) for f in (crop, crop[::-1], crop[:, ::-1])]
    ds = new_dataset(
        "jpeg8_fragments",
        rows,
        cols,
        ts=JPEGBaseline8Bit,
        SamplesPerPixel=3,
        PhotometricInterpretation="YBR_FULL_422",
        PlanarConfiguration=0,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        NumberOfFrames=3,
    )
    ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    files["jpeg8_fragments"] = save(ds, "jpeg8_fragments.dcm")

    # VOI LUT functions other than LINEAR, on a crop of MR_small (window 600/1600 in the file).
    mr16 = pixel_array(real_dir / "MR_small.dcm")[16:48, 16:48].astype(np.int16)
    for name, fn in (("sigmoid", "SIGMOID"), ("linear_exact", "LINEAR_EXACT")):
        ds = new_dataset(name, 32, 32, PixelRepresentation=1, VOILUTFunction=fn)
        ds.WindowCenter = 600
        ds.WindowWidth = 1600
        ds.PixelData = mr16.tobytes()
        files[name] = save(ds, f"{name}.dcm")

    # Deflated Explicit VR Little Endian.
    ds = new_dataset("deflate", 32, 32, PixelRepresentation=1)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.PixelData = mr16.tobytes()
    files["deflate"] = save(ds, "deflate.dcm")

    # Explicit VR Big Endian (retired, still found in archives): OW pixel data byte-swapped.
    ds = new_dataset("big_endian", 32, 32, PixelRepresentation=1, RescaleSlope=2, RescaleIntercept=10)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = mr16.astype(">i2").tobytes()
    ds["PixelData"].VR = "OW"
    files["big_endian"] = SYN / "big_endian.dcm"
    pydicom.dcmwrite(
        files["big_endian"], ds, implicit_vr=False, little_endian=False, enforce_file_format=True
    )

    # No preamble ("DICM" at offset 0, file meta present).
    ds = new_dataset("no_preamble", 32, 32, PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=-500)
    ds.PixelData = mr16.tobytes()
    path = SYN / "no_preamble.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes()[128:])
    files["no_preamble"] = path

    # A bare data set: no preamble, no file meta, implicit VR little endian.
    ds = new_dataset("raw_dataset", 32, 32, PixelRepresentation=1)
    ds.PixelData = mr16.tobytes()
    bare = Dataset()
    for elem in ds:
        bare.add(elem)
    path = SYN / "raw_dataset.dcm"
    pydicom.dcmwrite(path, bare, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[:2] == b"\x08\x00", "raw data set must start with group 0008"
    files["raw_dataset"] = path

    # An unsupported transfer syntax (JPEG 2000 Lossless) with a stand-in fragment.
    ds = new_dataset("j2k", 8, 8, ts=JPEG2000Lossless)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
    files["j2k"] = save(ds, "j2k_unsupported.dcm")

    # NIfTI: int16 with scl_slope/scl_inter, LAS affine, gzipped.
    shape = (20, 14, 5)
    i, j, k = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    vol = (i * 31 + j * 17 + k * 101 - 300).astype(np.int16)
    img = nib.Nifti1Image(vol, np.diag([-2.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, -3.0)
    files["scaled"] = SYN / "scaled.nii.gz"
    nib.save(img, files["scaled"])

    # NIfTI: float32 with NaN and +inf voxels, uncompressed, 3D.
    shape = (12, 10, 3)
    i, j, k = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    vol = (np.sin(i / 3.0) * 100 + j * 7.25 + k).astype(np.float32)
    vol[2, 3, 1] = np.nan
    vol[5, 5, 1] = np.inf
    img = nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0]))
    files["float_nan"] = SYN / "float_nan.nii"
    nib.save(img, files["float_nan"])

    # NIfTI: a 4D crop of example4d.nii.gz (the real file stays in the shared folder).
    src = nib.load(str(real_dir / "example4d.nii.gz"))
    data = np.asanyarray(src.dataobj)[32:96, 24:72, 8:16, :]
    img = nib.Nifti1Image(data, src.affine, src.header)
    files["small4d"] = SYN / "small4d.nii.gz"
    nib.save(img, files["small4d"])
    return files


def _jpeg_bytes(image):
    buf = BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared/data/medical-files")
    args = parser.parse_args()
    real = args.shared.resolve()
    if not real.is_dir():
        sys.exit(f"{real}: the shared medical test files are not there (pass --shared DIR)")

    if OUT.exists():
        shutil.rmtree(OUT)
    EXP.mkdir(parents=True)
    for name in REAL_COPIED:
        shutil.copyfile(real / name, OUT / name)
    syn = make_synthetic(real)

    def rel(path):
        return str(Path(path).relative_to(OUT))

    lossy = OUT / "JPEG-lossy.dcm"
    # (name, source for the test, kind, options, reference function, reference words)
    cases = [
        ("ct_small", rel(OUT / "CT_small.dcm"), "dicom", None, None, {}),
        ("ct_small_w40_400", rel(OUT / "CT_small.dcm"), "dicom", (40, 400), None, {}),
        ("mr_small", rel(OUT / "MR_small.dcm"), "dicom", None, None, {}),
        ("mr_small_w300_600", rel(OUT / "MR_small.dcm"), "dicom", (300, 600), None, {}),
        ("mr_small_rle", rel(OUT / "MR_small_RLE.dcm"), "dicom", None, None, {}),
        ("jpeg_lossy", rel(lossy), "dicom", None, None, {"decode": gdcm_decode}),
        ("ybr_color", rel(OUT / "examples_ybr_color.dcm"), "dicom", None, None, {"plugin": "pillow"}),
        ("ybr_color_slice0", rel(OUT / "examples_ybr_color.dcm"), "dicom", None, 0, {"plugin": "pillow"}),
        ("mono1", rel(syn["mono1"]), "dicom", None, None, {}),
        ("mono1_w1000_1000", rel(syn["mono1"]), "dicom", (1000, 1000), None, {}),
        ("multiframe", rel(syn["multiframe"]), "dicom", None, None, {}),
        ("multiframe_slice4", rel(syn["multiframe"]), "dicom", None, 4, {}),
        ("multiframe_slice0_w-2600_3000", rel(syn["multiframe"]), "dicom", (-2600, 3000), 0, {}),
        ("ybr422", rel(syn["ybr422"]), "dicom", None, None, {}),
        ("rgb_planar", rel(syn["rgb_planar"]), "dicom", None, None, {}),
        ("rle_ybr", rel(syn["rle_ybr"]), "dicom", None, None, {}),
        ("jpeg8_grey", rel(syn["jpeg8_grey"]), "dicom", None, None, {"plugin": "pillow"}),
        ("jpeg8_ybr", rel(syn["jpeg8_ybr"]), "dicom", None, None, {"plugin": "pillow"}),
        ("jpeg8_rgb_jfif", rel(syn["jpeg8_rgb_jfif"]), "dicom", None, None, {"plugin": "pillow"}),
        ("jpeg8_fragments", rel(syn["jpeg8_fragments"]), "dicom", None, None, {"plugin": "pillow"}),
        ("jpeg8_fragments_slice2", rel(syn["jpeg8_fragments"]), "dicom", None, 2, {"plugin": "pillow"}),
        ("sigmoid", rel(syn["sigmoid"]), "dicom", None, None, {}),
        ("linear_exact", rel(syn["linear_exact"]), "dicom", None, None, {}),
        ("deflate", rel(syn["deflate"]), "dicom", None, None, {}),
        ("big_endian", rel(syn["big_endian"]), "dicom", None, None, {}),
        ("no_preamble", rel(syn["no_preamble"]), "dicom", None, None, {}),
        ("raw_dataset", rel(syn["raw_dataset"]), "dicom", None, None, {}),
        ("anatomical", rel(OUT / "anatomical.nii"), "nifti", None, None, {}),
        ("anatomical_slice3", rel(OUT / "anatomical.nii"), "nifti", None, 3, {}),
        ("anatomical_w10000_20000", rel(OUT / "anatomical.nii"), "nifti", (10000, 20000), None, {}),
        ("example4d", "shared:example4d.nii.gz", "nifti", None, None, {}),
        ("small4d", rel(syn["small4d"]), "nifti", None, None, {}),
        ("small4d_slice0", rel(syn["small4d"]), "nifti", None, 0, {}),
        ("scaled", rel(syn["scaled"]), "nifti", None, None, {}),
        ("scaled_w10_100", rel(syn["scaled"]), "nifti", (10, 100), None, {}),
        ("float_nan", rel(syn["float_nan"]), "nifti", None, None, {}),
    ]

    manifest_cases = []
    raw_stats = {}
    for name, source, kind, window, slc, extra in cases:
        path = real / source.split(":", 1)[1] if source.startswith("shared:") else OUT / source
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "dicom":
                out, stats = dicom_reference(path, window, slc, **extra)
                if "decode" in extra:
                    reference = "GDCM (IJG libjpeg 6b, 12-bit, islow IDCT) + pydicom modality LUT"
                else:
                    plugin = extra.get("plugin") or "pydicom's default"
                    reference = f"pydicom pixel_array ({plugin}) + apply_modality_lut/apply_windowing"
            else:
                out, stats = nifti_reference(path, window, slc)
                reference = "nibabel dataobj + numpy"
        mode = "L" if out.ndim == 2 else "RGB"
        png = EXP / f"{name}.png"
        Image.fromarray(out, mode).save(png, optimize=True)
        entry = {
            "name": name,
            "source": source,
            "kind": kind,
            "window": list(window) if window else None,
            "slice": slc,
            "expected": rel(png),
            "width": int(out.shape[1]),
            "height": int(out.shape[0]),
            "channels": 1 if mode == "L" else 3,
            "min": int(out.min()),
            "max": int(out.max()),
            "mean": float(out.mean()),
            "max_diff": 1,
            "reference": reference,
        }
        if name == "jpeg_lossy":
            ds = pydicom.dcmread(lossy)
            alt = pylibjpeg_patched_se(ds).astype(np.int64)
            gd = gdcm_decode(lossy).astype(np.int64)
            alt_u8 = to_u8(minmax_unit(apply_modality_lut(alt, ds).astype(np.float64)))
            entry["note"] = (
                "pydicom cannot decode this file (its GDCM plugin refuses 12-bit JPEG Extended, "
                "pylibjpeg-libjpeg refuses the scan header's Se=0); reference: GDCM. "
                f"pylibjpeg-libjpeg with Se patched to 63 differs from GDCM by up to "
                f"{int(np.abs(alt - gd).max())} stored level(s) in {int((alt != gd).sum())} pixels, "
                f"{int(np.abs(alt_u8.astype(int) - out.astype(int)).max())} level(s) after windowing"
            )
        if stats is not None and window is None and slc is None:
            raw_stats[name] = stats
        manifest_cases.append(entry)
        print(f"{name:28} {mode:3} {out.shape[1]:4}x{out.shape[0]:<4} min {out.min():3} max {out.max():3} mean {out.mean():7.3f}")

    try:
        import gdcm

        gdcm_version = gdcm.Version.GetVersion()
    except Exception:  # pragma: no cover
        gdcm_version = None
    manifest = {
        "about": "Expected 8-bit pictures of medical files; written by tools/make_medical_fixtures.py",
        "versions": {
            "pydicom": pydicom.__version__,
            "nibabel": nib.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "gdcm": gdcm_version,
        },
        "conversion": (
            "grey: t = VOI(values) in 0..1 (LINEAR: clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1); "
            "no window: (x - min) / (max - min)); v = floor(t * 255 + 0.5); MONOCHROME1: 255 - v; "
            "NIfTI picture = flipud(data[:, :, k, 0].T)"
        ),
        "shared_dir": "../shared/data/medical-files",
        "cases": manifest_cases,
        "raw_stats": raw_stats,
        "sha256": {
            rel(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(OUT.rglob("*"))
            if p.is_file() and p.suffix != ".png"
        },
    }
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT.relative_to(ROOT)}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
