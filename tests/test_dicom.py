"""DICOM built with pydicom from a radiograph-like image: the model sees the same pixels as from the PNG."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from mura_demo.core.imaging import ImageInputError, load_image, load_views

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402


def make_dicom(stored: np.ndarray, bits: int, photometric: str = "MONOCHROME2", **tags) -> bytes:
    """A single- or multi-frame DICOM file holding ``stored`` (frames, rows, cols) or (rows, cols)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Secret^Patient", "ID-12345"
    ds.Modality = "CR"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def png_pixels(images):
    return np.asarray(load_image(images["wide"]))


@pytest.mark.parametrize(
    "bits,photometric,voi",
    [(8, "MONOCHROME2", None), (8, "MONOCHROME1", None), (12, "MONOCHROME2", None), (12, "MONOCHROME1", None),
     (16, "MONOCHROME2", None), (12, "MONOCHROME2", "window"), (16, "MONOCHROME1", "window"),
     (12, "MONOCHROME2", "lut")],
)  # fmt: skip
def test_dicom_pixels_match_png_path(png_pixels, bits, photometric, voi):
    top = 2**bits - 1
    stored = np.round(png_pixels.astype(np.float64) / 255 * top)
    if photometric == "MONOCHROME1":
        stored = top - stored
    tags = {}
    if voi == "window":  # a window spanning the whole stored range is the identity
        tags = {"WindowCenter": (top + 1) / 2, "WindowWidth": top + 1}
    elif voi == "lut":  # an identity VOI LUT with 12-bit output
        lut = Dataset()
        lut.add_new(0x00283002, "US", [top + 1, 0, 12])  # LUT Descriptor: entries, first value, bits
        lut.add_new(0x00283006, "OW", np.arange(top + 1, dtype=np.uint16).tobytes())  # LUT Data
        tags = {"VOILUTSequence": [lut]}
    data = make_dicom(stored, bits, photometric, **tags)
    seen = np.asarray(load_image(data)).astype(int)
    assert seen.shape == png_pixels.shape
    assert np.abs(seen - png_pixels.astype(int)).max() <= 1


def test_multi_frame_gives_one_view_per_frame(png_pixels):
    frames = np.stack([png_pixels, png_pixels[:, ::-1], 255 - png_pixels])
    views = load_views(make_dicom(frames, 8))
    assert len(views) == 3
    assert np.array_equal(np.asarray(views[1]), png_pixels[:, ::-1])
    with pytest.raises(ImageInputError, match="3 frames"):
        load_image(make_dicom(frames, 8))


def test_dicom_without_pixels_and_compressed_without_decoder(png_pixels):
    no_pixels = make_dicom(png_pixels, 8)
    ds = pydicom.dcmread(io.BytesIO(no_pixels))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageInputError, match="no pixel data"):
        load_image(buf.getvalue())
    ds = pydicom.dcmread(io.BytesIO(make_dicom(png_pixels, 8)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000, bytes left raw
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageInputError, match=r"compressed|corrupt"):
        load_image(buf.getvalue())


def test_patient_tags_never_reach_the_output(png_pixels, predictor, capsys):
    data = make_dicom(png_pixels, 8)
    result = json.dumps(predictor.predict(data).to_dict())
    printed = capsys.readouterr()
    for secret in ("Secret", "Patient", "ID-12345"):
        assert secret not in result and secret not in printed.out + printed.err
