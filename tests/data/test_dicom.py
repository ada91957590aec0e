"""DICOM ingest: pixel conversion (rescale, window, MONOCHROME1, 16 -> 8 bit), the generic
dicom_folder converter, CBIS-DDSM (TCIA layout and the CSV's own paths) and RSNA Pneumonia, on
DICOM files written here with pydicom."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_testing import skipped, write_dicom
from PIL import Image

from biomedgpt.data.build import build_shards
from biomedgpt.data.converters import SourceFormatError, open_converter
from biomedgpt.data.converters.dicom import dicom_to_png, window_to_uint8


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)))


CT = np.array([[0, 1064, 4095], [1000, 1100, 1200]], np.uint16)  # stored values; HU = stored - 1024


def test_rescale_window_and_monochrome1(tmp_path: Path):
    path = write_dicom(tmp_path / "ct.dcm", CT, photometric="MONOCHROME1", bits_stored=12, slope=1, intercept=-1024,
                       window=(40, 400))
    out = png_pixels(dicom_to_png(path.read_bytes()))
    # HU -1024 is below the window (black, inverted to white), 40 is its centre, 3071 above it
    assert out.dtype == np.uint8 and out.shape == (2, 3)
    assert out.tolist() == [[255, 127, 0], [168, 104, 40]]
    monochrome2 = write_dicom(tmp_path / "ct2.dcm", CT, bits_stored=12, slope=1, intercept=-1024, window=(40, 400))
    assert (png_pixels(dicom_to_png(monochrome2.read_bytes())) == 255 - out).all()


def test_minmax_when_no_window_and_16_bit_range(tmp_path: Path):
    pixels = np.array([[100, 200], [300, 65535]], np.uint16)  # full 16-bit range
    out = png_pixels(dicom_to_png(write_dicom(tmp_path / "a.dcm", pixels).read_bytes()))
    assert out.tolist() == [[0, 0], [1, 255]]
    assert png_pixels(dicom_to_png(write_dicom(tmp_path / "b.dcm", np.full((2, 2), 7, np.uint16)).read_bytes())).max() == 0
    forced = write_dicom(tmp_path / "c.dcm", CT, window=(1100, 201))
    assert png_pixels(dicom_to_png(forced.read_bytes(), window="minmax")).tolist() == \
        window_to_uint8(CT.astype(float)).tolist()
    signed = write_dicom(tmp_path / "d.dcm", np.array([[-1000, 0], [500, 1000]], np.int16), window=(0, 2001))
    assert png_pixels(dicom_to_png(signed.read_bytes())).tolist() == [[0, 128], [191, 255]]


def test_unreadable_dicom_names_the_file(tmp_path: Path):
    with pytest.raises(SourceFormatError, match=r"bad\.dcm: (not a readable DICOM file|DICOM file has no pixel data)"):
        dicom_to_png(b"not a dicom at all" * 20, source=str(tmp_path / "bad.dcm"))


def test_dicom_folder_build(tmp_path: Path):
    src = tmp_path / "src"
    write_dicom(src / "train/patient1/img.dcm", CT, photometric="MONOCHROME1", slope=1, intercept=-1024, window=(40, 400))
    write_dicom(src / "train/patient2/img.DCM", CT, uid_suffix=2)
    write_dicom(src / "test/patient3/img.dicom", CT, uid_suffix=3)
    (src / "train/patient1/notes.txt").write_text("not an image")
    conv = open_converter("ct_study", str(src), converter="dicom_folder", split_by="folder")
    assert conv.splits() == ["train", "test"] and conv.dataset == "ct_study"
    result = build_shards("ct_study", str(src), str(tmp_path / "out"), converter="dicom_folder",
                          options={"split_by": "folder"}, progress=False)
    assert result["train"].samples == 2 and result["test"].samples == 1
    with tarfile.open(tmp_path / "out/ct_study/train/ct_study-train-000000.tar") as tar:
        names = tar.getnames()
        assert len(names) == 4 and all("/" not in n for n in names)  # ids with '/' become safe keys
        record = json.loads(tar.extractfile(names[0]).read())
        assert record["task"] == "image" and record["id"] == "patient1/img" and record["source_format"] == "dicom"
        assert names[1].endswith(".png")
        assert png_pixels(tar.extractfile(names[1]).read()).tolist() == [[255, 127, 0], [168, 104, 40]]
    with pytest.raises(SourceFormatError, match="not a split folder"):
        write_dicom(src / "extra/x.dcm", CT)
        open_converter("ct_study", str(src), converter="dicom_folder", split_by="folder").splits()


# --- CBIS-DDSM ----------------------------------------------------------------------------------------

MASS_COLUMNS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
                "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
                "image file path", "cropped image file path", "ROI mask file path"]


def cbis_row(patient: str, side: str, view: str, n: int, pathology: str, prefix: str = "Mass-Training") -> dict:
    folder = f"{prefix}_{patient}_{side}_{view}"
    study, series = "1.3.6.1.4.1.9590.100.1.2.4221127222131896498076114346122289" + str(n), "1.3.6.1.4.1.9590.100.1.2.34238619481126763660869413259048" + f"{n:05d}"
    return {"patient_id": patient, "breast_density": "3", "left or right breast": side, "image view": view,
            "abnormality id": str(n), "abnormality type": "mass", "mass shape": "IRREGULAR", "mass margins": "SPICULATED",
            "assessment": "4", "pathology": pathology, "subtlety": "5",
            "image file path": f"{folder}/{study}/{series}/000000.dcm",
            "cropped image file path": f"{folder}_{n}/{study}/{series}1/000000.dcm\n",
            "ROI mask file path": f"{folder}_{n}/{study}/{series}2/000001.dcm\n"}


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(rows)


def test_cbis_ddsm_tcia_download_layout(tmp_path: Path):
    """The NBIA download's folder names differ from the CSV paths; crop and mask share a folder."""
    rows = [cbis_row("P_00001", "LEFT", "CC", 1, "MALIGNANT"), cbis_row("P_00004", "RIGHT", "MLO", 1, "BENIGN_WITHOUT_CALLBACK"),
            cbis_row("P_00004", "RIGHT", "MLO", 2, "BENIGN")]
    write_csv(tmp_path / "mass_case_description_train_set.csv", rows, MASS_COLUMNS)
    root = tmp_path / "CBIS-DDSM"
    big = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 16
    for i, row in enumerate(rows):
        folder = row["image file path"].split("/")[0]
        crop_folder = row["cropped image file path"].split("/")[0]
        write_dicom(root / folder / "07-20-2016-DDSM-74994" / "1.000000-full mammogram images-24515" / "1-1.dcm", big,
                    uid_suffix=10 + i)
        series = root / crop_folder / "08-29-2017-DDSM-96628" / "1.000000-ROI mask images-94682"
        write_dicom(series / "1-1.dcm", np.full((6, 5), 200 + i, np.uint16), uid_suffix=20 + i)  # the crop: small
        write_dicom(series / "1-2.dcm", (big > 1000).astype(np.uint16) * 255, uid_suffix=30 + i)  # the mask: full size
    conv = open_converter("cbis_ddsm_mass", str(tmp_path))
    assert conv.splits() == ["train"]
    recs = list(conv.records("train"))
    assert [r.id for r in recs] == ["P_00001_LEFT_CC_1", "P_00004_RIGHT_MLO_1", "P_00004_RIGHT_MLO_2"]
    assert [(r.record["label"], r.record["label_name"]) for r in recs] == [(1, "malignant"), (0, "benign"), (0, "benign")]
    assert recs[1].record["pathology"] == "BENIGN_WITHOUT_CALLBACK" and recs[0].record["mass_shape"] == "IRREGULAR"
    assert recs[0].record["breast_density"] == 3 and recs[0].record["abnormality_type"] == "mass"
    assert recs[0].image.url.endswith("/1-1.dcm") and png_pixels(recs[0].image.read()).shape == (6, 5)
    full = open_converter("cbis_ddsm_mass", str(tmp_path), image="full")
    assert png_pixels(next(full.records("train")).image.read()).shape == (64, 48)
    mask = open_converter("cbis_ddsm_mass", str(tmp_path), image="roi_mask")
    assert png_pixels(next(mask.records("train")).image.read()).shape == (64, 48)


def test_cbis_ddsm_csv_paths_and_errors(tmp_path: Path):
    rows = [cbis_row("P_00009", "LEFT", "MLO", 1, "MALIGNANT", prefix="Calc-Test")]
    columns = [c.replace("mass shape", "calc type").replace("mass margins", "calc distribution").replace(
        "breast_density", "breast density") for c in MASS_COLUMNS]
    rows = [{("breast density" if k == "breast_density" else "calc type" if k == "mass shape"
              else "calc distribution" if k == "mass margins" else k): v for k, v in r.items()} for r in rows]
    write_csv(tmp_path / "calc_case_description_test_set.csv", rows, columns)
    crop = rows[0]["cropped image file path"].strip()
    write_dicom(tmp_path / crop, np.full((4, 4), 9, np.uint16))  # the CSV's own path, directly under the source
    conv = open_converter("cbis_ddsm_calc", str(tmp_path))
    rec = next(conv.records("test"))
    assert rec.record["image"] == crop and rec.record["calc_type"] == "IRREGULAR" and rec.record["label_name"] == "malignant"
    rows[0]["pathology"] = "UNSURE"
    write_csv(tmp_path / "calc_case_description_test_set.csv", rows, columns)
    assert re.search(r"calc_case_description_test_set\.csv: line 2 \(P_00009_LEFT_MLO_1\): field 'pathology': "
                     r"expected one of", skipped(open_converter("cbis_ddsm_calc", str(tmp_path)), "test"))


def test_rsna_pneumonia(tmp_path: Path):
    (tmp_path / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n"
        "p-one,,,,,0\n"
        "p-two,264.0,152.0,213.0,379.0,1\n"
        "p-two,562.0,152.0,256.0,453.0,1\n")
    for i, patient in enumerate(["p-one", "p-two"]):
        write_dicom(tmp_path / "stage_2_train_images" / f"{patient}.dcm", np.full((8, 8), i * 50, np.uint16),
                    photometric="MONOCHROME2", modality="CR", uid_suffix=40 + i)
    conv = open_converter("rsna_pneumonia", str(tmp_path))
    assert conv.splits() == ["test"]
    recs = {r.id: r.record for r in conv.records("test")}
    assert recs["p-one"]["label_name"] == "normal" and recs["p-one"]["boxes"] == []
    assert recs["p-two"]["label_name"] == "pneumonia" and len(recs["p-two"]["boxes"]) == 2
    assert recs["p-two"]["boxes"][0] == [round(264 / 1024, 6), round(152 / 1024, 6), round(477 / 1024, 6), round(531 / 1024, 6)]


def test_deeplesion_16_bit_hounsfield_slices(tmp_path: Path):
    (tmp_path / "DL_info.csv").write_text(
        "File_name,Patient_index,Study_index,Series_ID,Key_slice_index,Measurement_coordinates,Bounding_boxes,"
        "Lesion_diameters_Pixel_,Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,"
        "Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test\n"
        '000001_01_01_109.png,1,1,1,109,"1,2,3,4","226.169, 90.0204, 241.252, 102.245","11.2, 9.8","0.4, 0.2, 0.5",3,0,'
        '"103, 115","0.78, 0.78, 5","512, 512","-175, 275",F,51,1\n'
        '000001_01_01_109.png,1,1,1,109,"1,2,3,4","100, 100, 140, 150","11.2, 9.8","0.4, 0.2, 0.5",-1,0,'
        '"103, 115","0.78, 0.78, 5","512, 512","-175, 275",F,51,1\n'
        '000002_01_01_020.png,2,1,1,20,"1,2,3,4","10, 10, 20, 20","1, 1","0.1, 0.1, 0.1",-1,0,'
        '"1, 30","0.7, 0.7, 5","512, 512","-1350, 150",M,60,3\n')
    hu = np.array([[-1024, -175], [50, 275]], dtype=np.int64)
    slice_dir = tmp_path / "Images_png/000001_01_01"
    slice_dir.mkdir(parents=True)
    Image.fromarray((hu + 32768).astype(np.uint16)).save(slice_dir / "109.png")
    conv = open_converter("deeplesion", str(tmp_path))
    assert conv.splits() == ["train", "test"]
    recs = list(conv.records("train"))
    assert len(recs) == 1 and recs[0].id == "000001_01_01_109" and recs[0].record["labels"] == ["mediastinum"]
    assert recs[0].record["boxes"] == [[round(226.169 / 512, 6), round(90.0204 / 512, 6), round(241.252 / 512, 6),
                                        round(102.245 / 512, 6)]]
    # window -175..275 HU: below it black, above it white, 50 HU in the middle
    assert png_pixels(recs[0].image.read()).tolist() == [[0, 0], [128, 255]]
    assert list(conv.records("test")) == [] and conv.dropped == {"test": {"no_typed_lesion": 1}}


def test_jpeg_compressed_dicom(tmp_path: Path):
    """JPEG Baseline transfer syntax (as RSNA's DICOMs use) decodes through pydicom's Pillow backend."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage

    pixels = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    out = png_pixels(dicom_to_png((tmp_path / "x.dcm").read_bytes()))
    assert out.shape == (8, 8) and np.abs(out.astype(int) - window_to_uint8(pixels.astype(float)).astype(int)).max() <= 3
