"""De-identification at ingest: scrubbing free text, the catalog's column allow-list, and reports and
messages scrubbed of every identifier known for their study (manifest row and DICOM headers)."""

from __future__ import annotations

import csv
import json
import logging
import warnings

import numpy as np
import pytest

from test_ingest_helpers import phantom_hu, save_nifti, write_axial_dicom
from voxsearch.ingest import IngestConfig, read_catalog, read_errors, run_ingest
from voxsearch.ingest.catalog import read_all_rows
from voxsearch.ingest.deid import scrub

R = "[redacted]"
WU = {"Patient Name": "Wu^Li", "last_name": "Wu", "Patient ID": "MRN-55501234", "Birth Date": "19491231"}


# --- scrub ------------------------------------------------------------------------------------------

def test_scrub_matches_whole_words_only():
    assert scrub("Ann has an Annular lesion; ANN agreed; Joanne, Anne", ["Ann"]) == (
        f"{R} has an Annular lesion; {R} agreed; Joanne, Anne")


def test_scrub_removes_every_part_of_a_name_in_any_order():
    for text in ("Mr Wu, Li was seen", "Mr Li Wu was seen", "Mr WU^LI was seen", "Mr wu li was seen", "Mr Wu was seen",
                 "Mr Li was seen"):
        assert scrub(text, ["Wu^Li"]) == f"Mr {R} was seen", text


def test_scrub_keeps_words_that_merely_contain_a_short_name_part():
    assert scrub("Lithium, Wuhan, Li-ion; Dr. S. Wu", ["Wu^Li^^Dr^Jr"]) == f"Lithium, Wuhan, {R}-ion; Dr. S. {R}"


def test_scrub_dicom_pn_groups_and_free_text_names():
    assert scrub("Yamada Tarou (山田太郎)", ["Yamada^Tarou=山田^太郎=やまだ^たろう"]) == f"{R} ({R}{R})"
    assert scrub("seen with O'Brien and Smith-Jones", ["O'Brien, Mary", "Smith-Jones^Ann"]) == f"seen with {R} and {R}"
    assert scrub("Quirkson saw Alva007 and Dr Ho", ["QUIRKSON^ALVA007", "Ho^An\\Ng^Yu"]) == f"{R} saw {R} and Dr {R}"


def test_scrub_finds_a_birth_date_in_common_formats():
    for written in ("19491231", "1949-12-31", "1949/12/31", "31.12.1949", "31/12/1949", "12/31/1949", "31-12-1949",
                    "31.12.49", "31 Dec 1949", "31st December 1949", "31-Dec-1949", "December 31, 1949",
                    "Dec. 31 1949", "1949-12-31T10:00"):
        assert scrub(f"born {written}.", ["19491231"]).startswith(f"born {R}"), written


def test_scrub_dates_single_digit_day_and_month_and_other_dates_survive():
    ids = ["1950-02-03"]
    assert scrub("born 3.2.1950, 2/3/1950, 3 Feb 1950", ids) == f"born {R}, {R}, {R}"
    assert scrub("CT of 4.2.1950 and 1950; 13.2.1950", ids) == "CT of 4.2.1950 and 1950; 13.2.1950"


def test_scrub_ids_with_or_without_separators():
    ids = ["MRN-55501234", "123-45-6789"]
    assert scrub("MRN-55501234, mrn 55501234, 55501234, 555-012-34; SSN 123456789, 123 45 6789", ids) == (
        f"{R}, {R}, {R}, {R}; SSN {R}, {R}")
    assert scrub("nodule 12 mm, 5501234 and 555012345", ids) == "nodule 12 mm, 5501234 and 555012345"
    assert scrub("nodule 7 mm", ["7", "", None]) == "nodule 7 mm"  # a one-digit "id" would wipe every size


# --- the manifest's columns -------------------------------------------------------------------------

def _manifest_archive(tmp_path, rows: list[dict], reports_beside: dict | None = None):
    archive = tmp_path / "arch"
    archive.mkdir()
    for i, row in enumerate(rows):
        save_nifti(archive / row["path"], phantom_hu(seed=i), np.eye(4))
    for name, text in (reports_beside or {}).items():
        (archive / name).write_text(text)
    with open(archive / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return archive


def _ingest(archive, out, **kw):
    return run_ingest(IngestConfig(archive=archive, out=out, engine="local", progress=False, salt="s",
                                   check_preprocess=None, **kw))


def _everything(out) -> str:
    rows = read_all_rows(out).to_pylist() + read_errors(out, all_runs=True).to_pylist()
    return json.dumps(rows, default=str) + (out / "catalog.json").read_text()


def test_unknown_manifest_columns_stay_out_unless_kept_and_kept_ones_are_scrubbed(tmp_path, caplog):
    rows = [{"path": "a.nii.gz", "report": "FINDINGS: Mr Wu, Li, born 31.12.1949, has a cyst.", **WU,
             "Ward Note": "ward of Dr. Wu", "site": "north"}]
    archive = _manifest_archive(tmp_path, rows)
    with caplog.at_level(logging.INFO, logger="voxsearch.ingest"):
        assert _ingest(archive, tmp_path / "plain").added == 1
    columns = read_catalog(tmp_path / "plain").column_names
    assert not {"patient_name", "patient name", "last_name", "patient_id", "birth_date", "ward_note", "ward note",
                "site"} & set(columns)
    assert "Ward Note" in caplog.text and "site" in caplog.text  # names of what was dropped, said once
    assert caplog.text.count("Ward Note") == 1 and "Dr. Wu" not in caplog.text and "north" not in caplog.text

    _ingest(archive, tmp_path / "kept", keep_columns=("Ward Note", "SITE"))
    row = read_catalog(tmp_path / "kept").to_pylist()[0]
    assert row["ward_note"] == f"ward of Dr. {R}" and row["site"] == "north"
    assert row["report"] == f"FINDINGS: Mr {R}, born {R}, has a cyst."
    for out in (tmp_path / "plain", tmp_path / "kept"):
        text = _everything(out)
        assert not any(v in text for v in ("Wu", "55501234", "19491231", "31.12.1949"))


@pytest.mark.parametrize("name", ["Patient Name", "patient_name", "PatientName", "last_name", "First Name", "DOB",
                                  "Patient's Birth Date", "MRN", "Accession Number", "Patient E-mail", "phone",
                                  "SSN", "Address", "Referring Physician Name"])
def test_identifier_columns_are_refused_even_when_named(tmp_path, name):
    with pytest.raises(ValueError, match="identifies a person"):
        IngestConfig(archive=tmp_path, out=tmp_path / "cat", keep_columns=(name,))


def test_cli_refuses_an_identifier_column_clearly(tmp_path, capsys):
    from voxsearch.cli import main

    archive = _manifest_archive(tmp_path, [{"path": "a.nii.gz", **WU}])
    code = main(["ingest", str(archive), "--out", str(tmp_path / "cat"), "--engine", "local", "--no-progress",
                 "--keep-column", "site", "--keep-column", "Patient Name"])
    assert code == 2
    assert "--keep-column 'Patient Name': identifies a person" in capsys.readouterr().out
    assert not (tmp_path / "cat" / "rows").exists()


def test_keep_column_cannot_shadow_a_catalog_column(tmp_path):
    with pytest.raises(ValueError, match="already a catalog column"):
        IngestConfig(archive=tmp_path, out=tmp_path / "cat", keep_columns=("patient_key",))


# --- reports and messages, at every entry point -----------------------------------------------------

def test_reports_from_text_files_are_scrubbed_of_the_manifest_rows_identifiers(tmp_path):
    rows = [{"path": "a.nii.gz", "report": "", **WU},
            {"path": "b.nii.gz", "report": "", "Patient Name": "Ann^Smith", "last_name": "", "Patient ID": "P-0042",
             "Birth Date": ""}]
    archive = _manifest_archive(tmp_path, rows, {
        "a.txt": "HISTORY: none\nFINDINGS: Li Wu (DOB December 31, 1949; record 55501234) has a cyst.",
        "b.txt": "FINDINGS: Ann Smith: annular pancreas. Annular calcification.",
    })
    _ingest(archive, tmp_path / "cat")
    reports = {r["source_path"].rsplit("/", 1)[1]: r["report"] for r in read_catalog(tmp_path / "cat").to_pylist()}
    assert reports["a.nii.gz"] == f"FINDINGS: {R} (DOB {R}; record {R}) has a cyst."
    assert reports["b.nii.gz"] == f"FINDINGS: {R}: annular pancreas. Annular calcification."


def test_identifiers_reach_the_workers_only_sealed(tmp_path, monkeypatch):
    from voxsearch.ingest import pipeline

    seen = []
    real = pipeline._results_local

    def spy(items, ctx):
        seen.extend(json.dumps(i) for i in items)
        return real(items, ctx)

    monkeypatch.setattr(pipeline, "_results_local", spy)
    archive = _manifest_archive(tmp_path, [{"path": "a.nii.gz", "report": "FINDINGS: Wu Li, cyst.", **WU}])
    _ingest(archive, tmp_path / "cat")
    assert seen and not any(v in s for s in seen for v in ("Wu Li", "Wu^Li", "55501234", "19491231"))
    assert read_catalog(tmp_path / "cat").column("report").to_pylist() == [f"FINDINGS: {R}, cyst."]


def _dicom_study(folder, identifiers, uid, report=None, bad_slope=None):
    import pydicom
    from pydicom.dataelem import DataElement

    write_axial_dicom(folder, phantom_hu(), identifiers=identifiers, uid=uid)
    if report is not None:
        (folder / "report.txt").write_text(report)
    if bad_slope is not None:  # a header value that echoes into the reader's error message
        for path in folder.glob("*.dcm"):
            ds = pydicom.dcmread(path)
            ds[0x00281053] = DataElement(0x00281053, "LO", bad_slope)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.save_as(path)


def test_dicom_reports_and_errors_are_scrubbed_of_header_and_manifest_identifiers(tmp_path):
    archive = tmp_path / "arch"
    header = {"PatientName": "WU^LI", "PatientID": "ID778899", "PatientBirthDate": "19491231",
              "ReferringPhysicianName": "HO^AN"}
    _dicom_study(archive / "s1", header, "1.2.826.0.1.3680043.2.1125.1",
                 report="FINDINGS: Li Wu, born 31.12.1949, accession A-99-1234: annular lesion. Dr An Ho.")
    _dicom_study(archive / "s2", {**header, "PatientName": "NG^YU"}, "1.2.826.0.1.3680043.2.1125.2", bad_slope="Yu Ng")
    with open(archive / "manifest.csv", "w", newline="") as fh:
        fh.write("path,Accession Number\ns1,A991234\ns2,\n")
    _ingest(archive, tmp_path / "cat")
    [row] = read_catalog(tmp_path / "cat").to_pylist()
    assert row["report"] == f"FINDINGS: {R}, born {R}, accession {R}: annular lesion. Dr {R}."
    [error] = [e for e in read_errors(tmp_path / "cat").to_pylist() if e["path"].endswith("s2")]
    assert error["reason"] == f"ValueError: could not convert string to float: '{R}'"
    text = _everything(tmp_path / "cat")
    assert not any(v in text for v in ("WU^LI", "Li Wu", "Yu Ng", "31.12.1949", "19491231", "ID778899", "A-99-1234"))
