"""DICOM photographs, as fundus cameras export them, read wherever an image is read.

The files are written here with pydicom in the layouts clinics send: Ophthalmic
Photography 8 and 16 bit, RGB and YBR_FULL uncompressed, JPEG baseline (`YBR_FULL_422`), several
frames, MONOCHROME2 — with a real fundus photograph (scikit-image's `retina.jpg`) as content.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from skimage import data

from visioncare.data.image_files import collect_images
from visioncare.data.preprocess import PreprocessConfig, UnreadableImageError, prepare, read_image

OP_8_BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16_BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The real fundus photo, small (RGB uint8, 240×320: a non-square frame)."""
    square = cv2.resize(data.retina(), (240, 240), interpolation=cv2.INTER_AREA)
    return cv2.copyMakeBorder(square, 0, 0, 40, 40, cv2.BORDER_CONSTANT, value=0)


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    photometric: str = "RGB",
    bits: int = 8,
    frames: int = 1,
    compressed: bytes | None = None,
) -> Path:
    """An Ophthalmic Photography file; ``pixels`` (F, H, W, C) or (H, W, C) or None (no image)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OP_16_BIT if bits > 8 else OP_8_BIT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if compressed else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OP"
    ds.ImageLaterality = "R"
    if pixels is not None:
        stack = pixels if pixels.ndim == 4 or (pixels.ndim == 3 and frames > 1) else pixels[None]
        ds.Rows, ds.Columns = stack.shape[1:3]
        ds.SamplesPerPixel = 1 if stack.ndim == 3 else stack.shape[3]
        ds.PhotometricInterpretation = photometric
        if ds.SamplesPerPixel == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = 16 if bits > 8 else 8
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if compressed is not None:
            ds.PixelData = encapsulate([compressed])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = stack.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _close(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    return a.shape == b.shape and float(np.abs(a.astype(int) - b).mean()) <= tolerance


def test_rgb_8_bit(tmp_path, photo):
    image = read_image(write_dicom(tmp_path / "op.dcm", photo))
    assert image.dtype == np.uint8 and np.array_equal(image, photo)


def test_ybr_full_is_converted_to_rgb(tmp_path, photo):
    ybr = convert_color_space(photo, "RGB", "YBR_FULL")
    image = read_image(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))
    assert _close(image, photo, 1.5)


def test_jpeg_compressed_ybr_full_422(tmp_path, photo):
    """What a Topcon camera sends when it compresses: JPEG baseline in a DICOM wrapper."""
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=95, subsampling="4:2:2")
    path = write_dicom(
        tmp_path / "jpeg.dcm", photo, photometric="YBR_FULL_422", compressed=buffer.getvalue()
    )
    assert _close(read_image(path), photo, 4.0)


def test_16_bit_is_scaled_by_its_stored_bits(tmp_path, photo):
    deep = (photo.astype(np.uint16) * 4) + 1  # 10-bit samples in 16-bit words
    image = read_image(write_dicom(tmp_path / "deep.dcm", deep, bits=10))
    assert image.dtype == np.uint8 and _close(image, photo, 1.0)


def test_first_frame_of_a_multi_frame_file(tmp_path, photo):
    frames = np.stack([photo, 255 - photo, photo // 2])
    image = read_image(write_dicom(tmp_path / "multi.dcm", frames, frames=3))
    assert np.array_equal(image, photo)


def test_monochrome_becomes_three_channels(tmp_path, photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    image = read_image(write_dicom(tmp_path / "gray.dcm", gray, photometric="MONOCHROME2"))
    assert image.shape == (*gray.shape, 3) and np.array_equal(image[..., 1], gray)


def test_dicom_without_suffix_is_recognised_by_its_magic(tmp_path, photo):
    path = write_dicom(tmp_path / "IM000001", photo)
    assert np.array_equal(read_image(path), photo)


def test_dicom_without_pixel_data_names_the_file(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", None)
    with pytest.raises(UnreadableImageError, match=r"report\.dcm is a DICOM file without pixel"):
        read_image(path)


def test_garbage_named_dcm_names_the_file(tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\x00" * 64 + b"not dicom at all")
    with pytest.raises(UnreadableImageError, match=r"broken\.dcm"):
        read_image(path)


def test_the_fundus_is_located_in_a_dicom(tmp_path, photo):
    prepared = prepare(write_dicom(tmp_path / "op.dcm", photo), PreprocessConfig(size=64))
    assert (prepared.width, prepared.height) == (320, 240)
    assert prepared.field is not None
    assert prepared.field.center_x == pytest.approx(160, abs=4)
    assert prepared.field.radius == pytest.approx(118, abs=5)


def test_folders_and_globs_include_dicom(tmp_path, photo):
    write_dicom(tmp_path / "a.dcm", photo)
    write_dicom(tmp_path / "b.DCM", photo)
    cv2.imwrite(str(tmp_path / "c.jpg"), photo)
    cv2.imwrite(str(tmp_path / "d.png"), photo)
    (tmp_path / "notes.txt").write_text("not an image")
    names = [p.name for p in collect_images(tmp_path)]
    assert names == ["a.dcm", "b.DCM", "c.jpg", "d.png"]
    assert [p.name for p in collect_images(f"{tmp_path}/*.dcm")] == ["a.dcm"]


def _dicom_table(root: Path, photo: np.ndarray, broken: bool = False) -> Path:
    """A CSV-table dataset of DICOM photos listed without extension (two per DR grade)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(10):
        write_dicom(root / f"eye{i}.dcm", np.roll(photo, 3 * i, axis=1))
        rows.append(f"eye{i},{i // 2},0")
    if broken:
        write_dicom(root / "report.dcm", None)
        rows.append("report,1,0")
    (root / "labels.csv").write_text("image,dr,dme\n" + "\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_training_data_can_be_dicom(tmp_path, make_cfg, photo):
    """The cache reads DICOM like any photo, and crops the located field."""
    from hydra.utils import instantiate

    root = _dicom_table(tmp_path / "clinic", photo)
    cfg = make_cfg("data=csv", f"data.root={root}", f"paths.cache_dir={tmp_path / 'cache'}")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert len(datamodule.cached) == 10
    cached = np.load(next(iter(datamodule.cached.values())))
    assert cached.shape == (72, 72, 3)
    assert not cached[[0, 0, -1, -1], [0, -1, 0, -1]].any() and cached[36, 36].any()


def test_dicom_without_pixels_in_a_dataset_fails_before_training(tmp_path, make_cfg, photo):
    from hydra.utils import instantiate

    from visioncare.errors import DataValidationError

    root = _dicom_table(tmp_path / "clinic", photo, broken=True)
    cfg = make_cfg("data=csv", f"data.root={root}", f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(DataValidationError, match=r"report\.dcm is a DICOM file without pixel"):
        instantiate(cfg.data).prepare_data()


def test_dicom_headers_name_patient_and_eye_and_splits_keep_both_eyes_together(tmp_path, photo):
    """Camera exports are named by UID: PatientID and ImageLaterality say whose eye it is."""
    from functools import partial

    import pydicom

    from visioncare.data.datamodule import FundusDataModule
    from visioncare.data.sources.csv_table import CSVTableSource

    rows = []
    for patient in range(10):
        for side in ("L", "R"):
            path = write_dicom(tmp_path / f"{generate_uid()}.dcm", photo)
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.ImageLaterality = f"P{patient}", side
            ds.save_as(path)
            rows.append(f"{path.name},{patient % 5},0")
    (tmp_path / "labels.csv").write_text("image,dr,dme\n" + "\n".join(rows) + "\n")
    source = partial(CSVTableSource, table="labels.csv")
    dm = FundusDataModule(
        source, root=str(tmp_path), cache_dir=str(tmp_path / "cache"), num_workers=0,
        image_size=32, cache_size=40, test_fraction=0.3, val_fraction=0.0,
        mean=(0.5,) * 3, std=(0.5,) * 3,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")  # DICOM headers give the patients before test is held out
    splits = dm.splits
    patients = {name: {r.patient for r in records} for name, records in splits.items()}
    assert patients["train"] and patients["test"]
    assert not patients["train"] & patients["test"]  # no patient on both sides
    records = [r for rs in splits.values() for r in rs]
    assert {r.laterality for r in records} == {"L", "R"} and all(r.patient for r in records)
