from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from steph.data.labels import DAYS_PER_MONTH, detect_convention, read_labels
from steph.errors import DataError

from .conftest import TCGA_FIXTURES

TCGA_ID = "TCGA-4Z-AA7M-01Z-00-DX1.05317C75-A8F3-4124-95D2-F039BEFFE63A"
FIXTURE_FILES = sorted(TCGA_FIXTURES.glob("*.csv"))


def _check_contract(df):
    assert list(df.columns) == ["patient_id", "slide_id", "time", "event"]
    assert df["time"].dtype == np.float64 and df["event"].dtype == np.int64
    assert df["patient_id"].map(type).eq(str).all() and df["slide_id"].map(type).eq(str).all()
    assert set(df["event"].unique()) <= {0, 1}
    assert not df["slide_id"].duplicated().any()


# ------------------------------------------------------------------ conventions -----------


def test_native(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event,extra
        A,A-1.svs,100,1,x
        A,A-2.svs,100,1,y
        B,B-1,35.5,0,z
    """)
    df = read_labels(p)
    _check_contract(df)
    assert df.attrs["convention"] == "native"
    assert df["slide_id"].tolist() == ["A-1", "A-2", "B-1"]
    assert df["time"].tolist() == [100.0, 100.0, 35.5]
    assert df["event"].tolist() == [1, 1, 0]


def test_mcat_months_to_days_and_censorship_flip(write_csv):
    p = write_csv("""
        ,case_id,slide_id,survival_months,censorship,oncotree_code
        0,TCGA-AA-0001,TCGA-AA-0001-01Z-00-DX1.ABC.svs,12,1,BLCA
        1,TCGA-AA-0002,TCGA-AA-0002-01Z-00-DX1.DEF.svs,0.5,0,BLCA
    """)
    df = read_labels(p)
    _check_contract(df)
    assert df.attrs["convention"] == "mcat"
    np.testing.assert_allclose(df["time"], [365.25, 0.5 * 365.25 / 12])
    assert DAYS_PER_MONTH == pytest.approx(30.4375)
    assert df["event"].tolist() == [0, 1]  # censorship 1 -> event 0
    assert df["slide_id"].tolist() == ["TCGA-AA-0001-01Z-00-DX1.ABC",
                                       "TCGA-AA-0002-01Z-00-DX1.DEF"]


def test_steph_release(write_csv):
    p = write_csv("""
        patient_id,pathology_id,t,e
        P1,P1-a.tif,10,1
        P2,P2-a.ndpi,20,0
    """)
    df = read_labels(p)
    assert df.attrs["convention"] == "steph"
    assert df.to_dict("list") == {"patient_id": ["P1", "P2"], "slide_id": ["P1-a", "P2-a"],
                                  "time": [10.0, 20.0], "event": [1, 0]}


def test_column_names_are_matched_case_insensitively(write_csv):
    p = write_csv("""
        Patient_ID , Slide_ID,TIME,Event
        A,s1,5,1
    """)
    assert read_labels(p)["time"].tolist() == [5.0]


def test_columns_override_with_months(write_csv):
    p = write_csv("""
        pid,wsi,months,dead,cens
        A,a.svs,2,1,0
        B,b.svs,4,0,1
    """)
    df = read_labels(p, columns={"patient_id": "pid", "slide_id": "wsi", "time": "months",
                                 "event": "dead"}, time_unit="months")
    np.testing.assert_allclose(df["time"], [2 * DAYS_PER_MONTH, 4 * DAYS_PER_MONTH])
    assert df["event"].tolist() == [1, 0]
    df2 = read_labels(p, columns={"patient_id": "pid", "slide_id": "wsi", "time": "months",
                                  "censorship": "cens"}, time_unit="days")
    assert df2["event"].tolist() == [1, 0] and df2["time"].tolist() == [2.0, 4.0]
    with pytest.raises(DataError, match="time_unit"):
        read_labels(p, columns={"patient_id": "pid", "slide_id": "wsi", "time": "months",
                                "event": "dead"})
    with pytest.raises(DataError, match="exactly one of 'event'"):
        read_labels(p, columns={"patient_id": "pid", "slide_id": "wsi", "time": "months",
                                "event": "dead", "censorship": "cens"}, time_unit="days")
    with pytest.raises(DataError, match=r"column 'nope' not found.*pid, wsi"):
        read_labels(p, columns={"patient_id": "pid", "slide_id": "nope", "time": "months",
                                "event": "dead"}, time_unit="days")


def test_time_unit_override_on_a_known_convention(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,1,1
    """)
    assert read_labels(p, time_unit="months")["time"].iat[0] == pytest.approx(30.4375)


def test_no_convention_matches(write_csv):
    p = write_csv("""
        who,wsi,when,what
        A,a,1,1
    """)
    with pytest.raises(DataError) as e:
        read_labels(p)
    msg = str(e.value)
    assert str(p) in msg and "who, wsi, when, what" in msg
    for name in ("native", "mcat", "tcga_cdr", "steph"):
        assert name in msg


def test_ambiguous_convention_needs_an_override(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event,pathology_id,t,e
        A,a,1,1,a,2,0
    """)
    with pytest.raises(DataError, match=r"several label conventions \(native, steph\)"):
        read_labels(p)
    assert read_labels(p, convention="steph")["time"].tolist() == [2.0]
    assert read_labels(p, convention="native")["time"].tolist() == [1.0]
    with pytest.raises(DataError, match="unknown label convention 'foo'"):
        read_labels(p, convention="foo")
    assert detect_convention(["case_id", "slide_id", "os_survival_days", "os_censorship"]) \
        == "tcga_cdr"


def test_boolean_event_values(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,1,True
        B,b,2,false
    """)
    assert read_labels(p)["event"].tolist() == [1, 0]


def test_tsv(tmp_path):
    p = tmp_path / "labels.tsv"
    p.write_text("patient_id\tslide_id\ttime\tevent\nA\ta\t3\t0\n")
    assert read_labels(p)["time"].tolist() == [3.0]


# ------------------------------------------------------------------ real TCGA-CDR excerpt -


def _independent(path, ep):
    raw = pd.read_csv(path)
    lab = raw.dropna(subset=[f"{ep}_survival_days", f"{ep}_censorship"])
    return raw, lab


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_tcga_cdr_dss_default_against_pandas(path, caplog):
    raw, lab = _independent(path, "dss")
    with caplog.at_level(logging.WARNING, logger="steph.data.labels"):
        df = read_labels(path)
    _check_contract(df)
    assert df.attrs["convention"] == "tcga_cdr" and df.attrs["endpoint"] == "dss"
    assert df["patient_id"].nunique() == lab["case_id"].nunique()
    assert len(df) == len(lab)
    assert df["slide_id"].tolist() == lab["slide_id"].tolist()  # dotted UUIDs intact
    np.testing.assert_array_equal(df["time"], lab["dss_survival_days"].to_numpy(float))
    np.testing.assert_array_equal(df["event"], 1 - lab["dss_censorship"].to_numpy(int))
    n_dropped = raw["case_id"].nunique() - lab["case_id"].nunique()
    assert sorted(df.attrs["dropped_patients"]) == sorted(
        set(raw["case_id"]) - set(lab["case_id"]))
    if n_dropped:
        assert f"dropped {n_dropped} patient(s)" in caplog.text
        assert df.attrs["dropped_patients"][0] in caplog.text
    else:
        assert "dropped" not in caplog.text


def test_tcga_cdr_blank_dss_is_dropped_in_blca_train(caplog):
    path = TCGA_FIXTURES / "TCGA_BLCA_fold0_train.csv"
    with caplog.at_level(logging.WARNING, logger="steph.data.labels"):
        df = read_labels(path)
    # TCGA-BT-A20P has dss_survival_days but a blank dss_censorship: missing label
    assert "TCGA-BT-A20P" not in set(df["patient_id"])
    assert "TCGA-BT-A20P" in caplog.text
    assert df["patient_id"].nunique() < pd.read_csv(path)["case_id"].nunique()
    assert (df["slide_id"] == TCGA_ID).sum() == 1


@pytest.mark.parametrize("ep", ["os", "pfi", "dfi", "DSS"])
def test_tcga_cdr_endpoint_selection(ep):
    path = TCGA_FIXTURES / "TCGA_BLCA_fold0_train.csv"
    _, lab = _independent(path, ep.lower())
    df = read_labels(path, endpoint=ep)
    assert df.attrs["endpoint"] == ep.lower()
    assert df["patient_id"].nunique() == lab["case_id"].nunique()
    np.testing.assert_array_equal(df["time"], lab[f"{ep.lower()}_survival_days"])
    np.testing.assert_array_equal(df["event"], 1 - lab[f"{ep.lower()}_censorship"].astype(int))


def test_tcga_cdr_os_differs_from_dss():
    path = TCGA_FIXTURES / "TCGA_BLCA_fold0_train.csv"
    os_, dss = read_labels(path, endpoint="os"), read_labels(path)
    assert os_["event"].sum() > dss["event"].sum()  # every DSS death is an OS death


def test_tcga_cdr_os_when_no_dss(write_csv):
    p = write_csv("""
        case_id,slide_id,os_survival_days,os_censorship,pfi_survival_days,pfi_censorship
        A,a,10,0,5,0
    """)
    df = read_labels(p)
    assert df.attrs["endpoint"] == "os" and df["event"].tolist() == [1]
    with pytest.raises(DataError, match=r"endpoint 'dss' requested.*\['os', 'pfi'\]"):
        read_labels(p, endpoint="dss")
    with pytest.raises(DataError, match="unknown endpoint 'xyz'"):
        read_labels(p, endpoint="xyz")


def test_endpoint_on_another_convention_is_an_error(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,1,1
    """)
    with pytest.raises(DataError, match=r"endpoint='os' only applies to tcga_cdr"):
        read_labels(p, endpoint="os")


# ------------------------------------------------------------------ errors ----------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"label file not found: .*nope\.csv"):
        read_labels(tmp_path / "nope.csv")


def test_negative_time(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,10,1
        B,b,-3,0
    """)
    with pytest.raises(DataError) as e:
        read_labels(p)
    msg = str(e.value)
    assert str(p) in msg and "'time'" in msg and "line 3" in msg and "'B'" in msg
    assert "negative" in msg


@pytest.mark.parametrize("value", ["2", "-1", "0.5", "yes"])
def test_event_values_other_than_0_1(write_csv, value):
    p = write_csv(f"""
        case_id,slide_id,survival_months,censorship
        A,a,10,1
        B,b,3,{value}
    """)
    with pytest.raises(DataError) as e:
        read_labels(p)
    msg = str(e.value)
    assert str(p) in msg and "'censorship'" in msg and "'B'" in msg and "line 3" in msg


def test_non_numeric_time(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,ten,1
    """)
    with pytest.raises(DataError, match=r"column 'time' has non-numeric values: line 2 "
                                        r"\(patient 'A'\): 'ten'"):
        read_labels(p)


def test_infinite_time(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,inf,1
    """)
    with pytest.raises(DataError, match=r"'time' has non-finite"):
        read_labels(p)


def test_conflicting_labels_within_a_patient(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a1,10,1
        A,a2,12,1
        B,b1,5,0
        B,b2,5,1
    """)
    with pytest.raises(DataError) as e:
        read_labels(p)
    msg = str(e.value)
    assert str(p) in msg and "patient 'A'" in msg and "'time' differs" in msg
    assert "patient 'B'" in msg and "'event' differs" in msg
    assert "line 2" in msg and "line 3" in msg


def test_label_blank_on_some_rows_only_is_a_conflict(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a1,10,1
        A,a2,,1
    """)
    with pytest.raises(DataError, match=r"patient 'A'.*blank on some rows only"):
        read_labels(p)


def test_slide_under_two_patients(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,s1.svs,10,1
        B,s1,10,1
    """)
    with pytest.raises(DataError) as e:
        read_labels(p)
    msg = str(e.value)
    assert "slide 's1'" in msg and "'A'" in msg and "'B'" in msg and "'slide_id'" in msg


def test_blank_ids(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        ,a,1,1
    """)
    with pytest.raises(DataError, match=r"column 'patient_id' has blank patient ids: line 2"):
        read_labels(p)


def test_exact_duplicates_are_removed_with_a_log_line(write_csv, caplog):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,1,1
        A,a,1,1
        B,b,2,0
    """)
    with caplog.at_level(logging.INFO, logger="steph.data.labels"):
        df = read_labels(p)
    assert df["slide_id"].tolist() == ["a", "b"]
    assert "removed 1 duplicate row(s) (lines 3)" in caplog.text


def test_missing_labels_dropped_and_counted(write_csv, caplog):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,1,1
        B,b1,,0
        B,b2,,0
        C,c,NA,
        D,d,4,0
    """)
    with caplog.at_level(logging.WARNING, logger="steph.data.labels"):
        df = read_labels(p)
    assert df["patient_id"].tolist() == ["A", "D"]
    assert df.attrs["dropped_patients"] == ["B", "C"]
    assert "dropped 2 patient(s) (3 slide row(s))" in caplog.text and "B, C" in caplog.text


def test_all_labels_missing_is_an_error(write_csv):
    p = write_csv("""
        patient_id,slide_id,time,event
        A,a,,1
    """)
    with pytest.raises(DataError, match="no labelled slide left"):
        read_labels(p)
