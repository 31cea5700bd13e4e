"""The PACS mirror de-identifies to DICOM PS3.15 (Basic Profile): a series with identifiers planted at the top
level, in nested sequences, in private tags and in overlays goes through the mirror's fetch (no PACS needed:
a stand-in client hands over the datasets as dicomweb-client would)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

SALT = "deid-test-salt"
CREATOR = "ACME ZQ 1.0"
# Substrings that must not survive anywhere in a mirrored file; each is planted below.
PLANTED = (
    "QUIXOTE", "ZEBEDIAH", "PID-4711-ZQ", "19490315", "OTHERPID-31337", "ACC99887766", "ACCNEST-REQ1",
    "ISSUERNEST-ZQ", "ACCNEST-DEEP2", "STUDYID-7788", "SERIESDESC-QUIX", "DRREFER", "ALOYSIUS", "DRPERF",
    "BARNABY", "CUTHBERT", "HUBERTUS", "GRIMBLE", "STATION-XRAY-07", "SN-55667788", "PROTO-ZQ", "COMMENT-ZQ",
    "OVERLAYBYTES-ZQ", "CURVE-ZQ", "ACME ZQ", "20200115", "20210620",
)


def _write_series(folder: Path, *, patient_id: str, study_date: str, n: int = 4) -> dict:
    """A CT series with identifiers everywhere Table E.1-1 looks; returns its UIDs and the expected volume."""
    folder.mkdir(parents=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(),
            "sop": [generate_uid() for _ in range(n)]}
    rng = np.random.default_rng(7)
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uids["sop"][k]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(f"{k}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uids["sop"][k]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
        ds.Modality, ds.BodyPartExamined = "CT", "HEAD"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "QUIXOTE^ZEBEDIAH", patient_id, "19490315"
        ds.PatientSex, ds.PatientAge, ds.PatientAddress = "M", "074Y", "12 GRIMBLE LANE"
        ds.OtherPatientIDs = "OTHERPID-31337"
        ds.AccessionNumber, ds.StudyID = "ACC99887766", "STUDYID-7788"
        ds.StudyDescription, ds.SeriesDescription = "ZEBEDIAH HEAD CT", "SERIESDESC-QUIX"
        ds.ProtocolName, ds.ImageComments = "PROTO-ZQ", "COMMENT-ZQ for ZEBEDIAH"
        ds.ReferringPhysicianName, ds.PerformingPhysicianName = "DRREFER^ALOYSIUS", "DRPERF^BARNABY"
        ds.OperatorsName = "OPER^CUTHBERT"
        ds.InstitutionName, ds.InstitutionAddress = "SAINT HUBERTUS HOSPITAL", "12 GRIMBLE LANE, OXBRIDGE"
        ds.StationName, ds.DeviceSerialNumber = "STATION-XRAY-07", "SN-55667788"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime, ds.SeriesTime, ds.ContentTime = "101500", "102000", f"1025{k:02d}"
        ds.AcquisitionDateTime = f"{study_date}102400"
        request = Dataset()
        request.AccessionNumber = "ACCNEST-REQ1"
        issuer = Dataset()
        issuer.LocalNamespaceEntityID = "ISSUERNEST-ZQ"
        request.IssuerOfAccessionNumberSequence = [issuer]
        ds.RequestAttributesSequence = [request]
        # A sequence the profile keeps: recursion has to reach inside it.
        purpose = Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = "121311", "DCM", "Localizer"
        purpose.AccessionNumber, purpose.PatientName = "ACCNEST-DEEP2", "QUIXOTE^ZEBEDIAH"
        source = Dataset()
        source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = CTImageStorage, uids["sop"][0]
        source.PurposeOfReferenceCodeSequence = [purpose]
        ds.SourceImageSequence = [source]
        ds.private_block(0x0009, CREATOR, create=True).add_new(0x01, "LO", "QUIXOTE ZEBEDIAH PRIVATE")
        for elem, vr, value in ((0x0010, "US", 4), (0x0011, "US", 4), (0x0040, "CS", "G"), (0x0050, "SS", [1, 1]),
                                (0x0100, "US", 1), (0x0102, "US", 0), (0x0022, "LO", "OVERLAY ZEBEDIAH"),
                                (0x3000, "OW", b"OVERLAYBYTES-ZQ!")):
            ds.add_new(0x60000000 | elem, vr, value)
        ds.add_new(0x50002500, "LO", "CURVE-ZQ")
        ds.ImagePositionPatient = [-40.0, -35.5, 12.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9805807, -0.1961161]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.7], 2.5
        ds.Rows, ds.Columns = 8, 6
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
        # Below 2048: no pixel byte pair can spell a planted ASCII string by chance.
        ds.PixelData = rng.integers(0, 2048, size=(8, 6), dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    return uids


class _Pacs:
    """Stands in for dicomweb-client: QIDO listings and WADO instances from folders of DICOM files."""

    def __init__(self, series: dict[Path, dict]):
        self.series = series  # folder -> uids

    def _find(self, study_uid=None, series_uid=None):
        return [(f, u) for f, u in self.series.items()
                if study_uid in (None, u["study"]) and series_uid in (None, u["series"])]

    def search_for_studies(self, **_):
        return [{"0020000D": {"vr": "UI", "Value": [u]}} for u in dict.fromkeys(u["study"] for _, u in self._find())]

    def search_for_series(self, study_uid, **_):
        return [{"0020000E": {"vr": "UI", "Value": [u["series"]]}, "00080060": {"vr": "CS", "Value": ["CT"]},
                 "00201209": {"vr": "IS", "Value": [len(u["sop"])]}} for _, u in self._find(study_uid)]

    def iter_series(self, study_uid, series_uid):
        ((folder, _),) = self._find(study_uid, series_uid)
        return (pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm")))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pacs-source")
    return {
        "a1": (root / "a1", _write_series(root / "a1", patient_id="PID-4711-ZQ", study_date="20200115")),
        # The same patient's later study, and another patient.
        "a2": (root / "a2", _write_series(root / "a2", patient_id="PID-4711-ZQ", study_date="20210620")),
        "b": (root / "b", _write_series(root / "b", patient_id="PID-0815-ZQ", study_date="20200115")),
    }


def _fetch(source, name: str, dest: Path, salt: str = SALT) -> list[pydicom.Dataset]:
    from voxsearch.ingest.dicomweb import DicomWebConfig, RemoteSeries, fetch_series

    folder, uids = source[name]
    series = RemoteSeries(study_uid=uids["study"], series_uid=uids["series"], modality="CT",
                          instances=len(uids["sop"]), salt=salt)
    config = DicomWebConfig(url="http://pacs.invalid/dicom-web", salt=salt)
    assert fetch_series(_Pacs({folder: uids}), series, dest, config) == len(uids["sop"])
    return [pydicom.dcmread(p) for p in sorted(dest.glob("*.dcm"))]


def _walk(ds: Dataset):
    """Every element at any depth, the file meta included."""
    for elem in list(getattr(ds, "file_meta", None) or []) + list(ds):
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _text(elem) -> str:
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)


def _uids(ds: Dataset) -> tuple:
    return (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.SOPInstanceUID)


def _when(date: str, time: str) -> dt.datetime:
    return dt.datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")


def test_nothing_planted_survives_anywhere(source, tmp_path):
    dest = tmp_path / "mirror" / "a1"
    written = _fetch(source, "a1", dest)
    originals = {source["a1"][1][k] for k in ("study", "series", "frame")} | set(source["a1"][1]["sop"])
    blob = b"".join(p.read_bytes() for p in dest.iterdir())
    for planted in (*PLANTED, *originals):
        assert planted.encode() not in blob, f"{planted!r} reached the mirror"
    for ds in written:
        for elem in _walk(ds):
            assert not elem.tag.is_private, f"private {elem.tag} kept"
            assert elem.tag.group & 0xFF00 not in (0x5000, 0x6000), f"curve/overlay {elem.tag} kept"
            assert elem.keyword not in ("PatientBirthDate", "PatientAge", "PatientSex", "StudyDescription",
                                        "SeriesDescription", "StationName", "DeviceSerialNumber", "InstitutionName",
                                        "RequestAttributesSequence", "OtherPatientIDs"), elem.keyword
            for planted in (*PLANTED, *originals):
                assert planted not in _text(elem), f"{planted!r} in {elem.keyword or elem.tag}"
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod
        assert "113100" in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}  # Basic Profile
        # Type 2 identifiers stay present, as pseudonyms.
        assert ds.PatientID and ds.AccessionNumber and ds.StudyID
        # The nested sequence the profile keeps was cleaned inside, and its reference follows the remapping.
        (source_item,) = ds.SourceImageSequence
        assert source_item.ReferencedSOPInstanceUID == written[0].SOPInstanceUID


def test_uids_remap_consistently_with_the_salt(source, tmp_path):
    from voxsearch.ingest.deid import salted_hash
    from voxsearch.ingest.dicom_reader import scan_series
    from voxsearch.ingest.dicomweb import RemoteSeries

    first = _fetch(source, "a1", tmp_path / "one")
    again = _fetch(source, "a1", tmp_path / "two")
    other_salt = _fetch(source, "a1", tmp_path / "three", salt="another-salt")
    uids = source["a1"][1]
    assert [_uids(d) for d in first] == [_uids(d) for d in again]
    originals = (uids["study"], uids["series"], uids["frame"])
    for ds, sop in zip(first, uids["sop"]):
        assert set(_uids(ds)).isdisjoint({*originals, sop})
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CTImageStorage
    for a, b in zip(first, other_salt):
        assert set(_uids(a)).isdisjoint(_uids(b))
    assert first[0].PatientID == again[0].PatientID and first[0].AccessionNumber == again[0].AccessionNumber
    # The mirror's key for a series is the series_id ingest gives the mirrored files: sync's "already
    # mirrored" and "gone from the PACS" compare the two.
    listed = RemoteSeries(study_uid=uids["study"], series_uid=uids["series"], modality="CT", instances=4, salt=SALT)
    (scanned,), _ = scan_series(tmp_path / "one")
    assert listed.key == salted_hash(SALT, "series", scanned.series_uid)
    assert listed.study_key == salted_hash(SALT, "study", scanned.study_uid)


def test_dates_shift_by_one_offset_per_patient(source, tmp_path):
    a1 = _fetch(source, "a1", tmp_path / "a1")[0]
    a2 = _fetch(source, "a2", tmp_path / "a2")[0]
    b = _fetch(source, "b", tmp_path / "b")[0]
    original = {"a1": _when("20200115", "101500"), "a2": _when("20210620", "101500"), "b": _when("20200115", "101500")}
    shift_a1 = _when(a1.StudyDate, a1.StudyTime) - original["a1"]
    assert shift_a1 < dt.timedelta(0)
    # Every date of the instance moves by the same amount...
    assert _when(a1.SeriesDate, a1.SeriesTime) - _when("20200115", "102000") == shift_a1
    assert _when(a1.ContentDate, a1.ContentTime) - _when("20200115", "102500") == shift_a1
    assert _when(a1.AcquisitionDateTime[:8], a1.AcquisitionDateTime[8:]) - _when("20200115", "102400") == shift_a1
    # ...and so does the patient's other study, so the interval between them is kept.
    assert _when(a2.StudyDate, a2.StudyTime) - original["a2"] == shift_a1
    assert _when(b.StudyDate, b.StudyTime) - original["b"] != shift_a1


def test_the_image_reads_as_before(source, tmp_path):
    from voxsearch.ingest.dicom_reader import read_dicom

    folder, _ = source["a1"]
    _fetch(source, "a1", tmp_path / "a1")
    before, after = read_dicom(folder), read_dicom(tmp_path / "a1")
    assert np.array_equal(before.array, after.array)
    assert np.allclose(before.affine, after.affine) and before.spacing == after.spacing
    assert (before.modality, before.units, before.meta["body_part"]) == (after.modality, after.units, "HEAD")
    assert after.meta["study_date"] != before.meta["study_date"]


def test_mirror_state_holds_no_original_uid_and_resyncs_by_key(source, tmp_path, monkeypatch):
    from voxsearch.ingest import dicomweb

    folder, uids = source["a1"]
    pacs = _Pacs({folder: uids})
    monkeypatch.setattr(dicomweb, "connect", lambda config: pacs)
    mirror = dicomweb.Mirror(tmp_path / "mirror")
    config = dicomweb.DicomWebConfig(url="http://pacs.invalid/dicom-web", salt=SALT)
    first = mirror.pull(config, progress=False)
    assert len(first.added) == 1 and not first.errors
    stored = b"".join(p.read_bytes() for p in mirror.root.rglob("*") if p.is_file())
    for original in (uids["study"], uids["series"], *uids["sop"]):
        assert original.encode() not in stored, "an original UID reached the mirror or its state"
    again = mirror.pull(config, progress=False)
    assert again.added == again.changed == again.gone == []
    pacs.series = {}
    assert mirror.pull(config, progress=False).gone == first.added


def test_mirror_state_is_fsynced_before_it_replaces_the_old(tmp_path, monkeypatch):
    from voxsearch.ingest.dicomweb import Mirror

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b)))
    mirror = Mirror(tmp_path / "mirror")
    mirror.drop([])
    assert "replace state.json" in events
    assert "fsync" in events[: events.index("replace state.json")]
    assert json.loads(mirror.state_path.read_text()) == {}
