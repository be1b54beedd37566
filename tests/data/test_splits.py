from __future__ import annotations

import logging
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from steph.data.cohort import Cohort
from steph.data.labels import read_labels
from steph.data.splits import (
    Split,
    check_split,
    check_splits,
    create_splits,
    find_split_files,
    load_or_create_splits,
    read_splits,
    stratify_labels,
    write_splits,
)
from steph.errors import DataError

from .conftest import TCGA_FIXTURES, PatientSpec


def _patients(n=100, seed=0, event_rate=0.3):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "patient_id": [f"P{i:03d}" for i in range(n)],
        "time": rng.integers(1, 5000, n).astype(float),
        "event": (rng.random(n) < event_rate).astype(int),
    })


# ------------------------------------------------------------------ creation --------------


def test_invariants():
    df = _patients()
    splits = create_splits(df, k=5, seed=0)
    assert [s.fold for s in splits] == list(range(5))
    all_ids = set(df["patient_id"])
    test_count = Counter()
    for s in splits:
        assert not set(s.train_ids) & set(s.test_ids)
        assert set(s.train_ids) | set(s.test_ids) == all_ids
        assert len(s.train_ids) + len(s.test_ids) == len(all_ids)
        assert list(s.test_ids) == sorted(s.test_ids)
        test_count.update(s.test_ids)
    assert set(test_count) == all_ids and set(test_count.values()) == {1}
    assert {len(s.test_ids) for s in splits} == {20}


def test_stratification_balances_events_and_time():
    df = _patients(n=200, seed=3, event_rate=0.25)
    splits = create_splits(df, k=5, seed=1)
    ev = df.set_index("patient_id")["event"]
    t = df.set_index("patient_id")["time"]
    n_events = [int(ev[list(s.test_ids)].sum()) for s in splits]
    assert max(n_events) - min(n_events) <= 2, n_events
    med = [float(t[list(s.test_ids)].median()) for s in splits]
    assert max(med) - min(med) < 0.25 * t.median(), med


def test_unstratified_would_be_less_balanced():
    """Check that the balance test above can fail: a deliberately bad split breaks it."""
    df = _patients(n=200, seed=3, event_rate=0.25).sort_values("event")
    ids = df["patient_id"].tolist()
    ev = df.set_index("patient_id")["event"]
    n_events = [int(ev[ids[i * 40:(i + 1) * 40]].sum()) for i in range(5)]
    assert max(n_events) - min(n_events) > 2


def test_determinism_seed_and_order_independence():
    df = _patients()
    a = create_splits(df, seed=7)
    assert a == create_splits(df, seed=7)
    assert a == create_splits(df.sample(frac=1.0, random_state=1), seed=7)
    assert a != create_splits(df, seed=8)


def test_accepts_slide_level_frame_and_cohort(make_cohort):
    df = _patients(n=20)
    slide_level = pd.concat([df, df.iloc[:5]])  # some patients twice (two slides)
    assert create_splits(slide_level, k=4) == create_splits(df, k=4)
    specs = [PatientSpec(f"P{i:02d}", float(10 * i + 1), int(i % 3 == 0), [2]) for i in range(15)]
    c = Cohort.load(make_cohort("C", specs).root)
    splits = create_splits(c, k=3)
    check_splits(splits, c.patient_ids, partition=True)


def test_small_strata_fall_back_gracefully(caplog):
    df = _patients(n=40, event_rate=0.0)
    df.loc[:2, "event"] = 1  # only 3 events for k = 5
    with caplog.at_level(logging.INFO, logger="steph.data.splits"):
        splits = create_splits(df, k=5)
    check_splits(splits, df["patient_id"], partition=True)
    events_per_fold = [int(df.set_index("patient_id").loc[list(s.test_ids), "event"].sum())
                       for s in splits]
    assert sorted(events_per_fold) == [0, 0, 1, 1, 1]  # spread, never two in one fold
    assert "strata smaller than k=5" in caplog.text
    assert "3 patient(s) with event=1 -> 1 time stratum" in caplog.text


def test_every_stratum_small_uses_plain_kfold(caplog):
    df = _patients(n=6)
    df["event"] = [1, 1, 1, 0, 0, 0]
    with caplog.at_level(logging.WARNING, logger="steph.data.splits"):
        splits = create_splits(df, k=5)
    check_splits(splits, df["patient_id"], partition=True)
    assert "plain shuffled k-fold" in caplog.text


def test_too_few_patients():
    with pytest.raises(DataError, match="cannot make 5 folds from 4 patient"):
        create_splits(_patients(n=4), k=5)
    with pytest.raises(DataError, match="k must be at least 2"):
        create_splits(_patients(), k=1)


def test_stratify_labels_sizes():
    times = np.arange(100.0)
    events = np.r_[np.ones(30), np.zeros(70)].astype(int)
    lab = stratify_labels(times, events, k=5, n_time_strata=4)
    counts = Counter(lab)
    assert len(counts) == 8 and min(counts.values()) >= 5
    # time strata are ordered by time within an event group
    assert lab[0] == "event1_t0" and lab[29] == "event1_t3" and lab[99] == "event0_t3"


# ------------------------------------------------------------------ checks ----------------


def test_check_split_names_overlapping_patients():
    with pytest.raises(DataError, match=r"fold 2 \(somewhere\): 2 patient\(s\) in both train "
                                        r"and test: 'B', 'C'"):
        check_split(Split(2, ("A", "B", "C"), ("B", "C", "D")), "somewhere")
    with pytest.raises(DataError, match="no test patient"):
        check_split(Split(0, ("A",), ()))
    with pytest.raises(DataError, match="in more than one test fold: 'A'"):
        check_splits([Split(0, ("B",), ("A",)), Split(1, ("B",), ("A",))], partition=True)
    with pytest.raises(DataError, match="in no test fold: 'C'"):
        check_splits([Split(0, ("B", "C"), ("A",)), Split(1, ("A", "C"), ("B",))],
                     ["A", "B", "C"], partition=True)


def test_write_refuses_overlap(tmp_path):
    with pytest.raises(DataError, match="both train and test: 'X'"):
        write_splits([Split(0, ("X", "Y"), ("X",))], tmp_path / "out")
    assert not (tmp_path / "out" / "fold_0.csv").exists()


# ------------------------------------------------------------------ files -----------------


def test_write_read_round_trip(tmp_path):
    df = _patients(n=30)
    splits = create_splits(df, k=3, seed=2)
    paths = write_splits(splits, tmp_path / "s")
    assert [p.name for p in paths] == ["fold_0.csv", "fold_1.csv", "fold_2.csv"]
    f0 = pd.read_csv(paths[0])
    assert list(f0.columns) == ["patient_id", "split"]
    assert set(f0["split"]) == {"train", "test"}
    assert read_splits(tmp_path / "s") == splits
    assert read_splits(tmp_path / "s", df["patient_id"]) == splits


def test_native_file_with_overlap_or_bad_value(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "fold_0.csv").write_text("patient_id,split\nA,train\nB,train\nA,test\n")
    with pytest.raises(DataError, match=r"fold 0 \(.*fold_0\.csv\).*both train and test: 'A'"):
        read_splits(d)
    (d / "fold_0.csv").write_text("patient_id,split\nA,train\nB,validation\n")
    with pytest.raises(DataError, match=r"fold_0\.csv: column 'split' must be 'train' or 'test'"
                                        r"; got line 3: 'validation'"):
        read_splits(d)


def test_mcat_splits(tmp_path, caplog):
    d = tmp_path / "splits"
    d.mkdir()
    # unequal column lengths -> blank cells; val is the held-out set
    (d / "splits_0.csv").write_text(",train,val\n0,A,D\n1,B,E\n2,C,\n3,X,\n")
    (d / "splits_1.csv").write_text(",train,val,test\n0,A,B,E\n1,C,,D\n2,X,,\n")
    ids = ["A", "B", "C", "D", "E"]
    with caplog.at_level(logging.WARNING, logger="steph.data.splits"):
        splits = read_splits(d, ids)
    assert splits[0] == Split(0, ("A", "B", "C"), ("D", "E"))
    assert splits[1] == Split(1, ("A", "C"), ("D", "E"))  # non-empty test column wins
    assert "dropped 2 id(s) not in the cohort (fold 0: 1, fold 1: 1)" in caplog.text
    assert "X" in caplog.text
    assert read_splits(d)[0].train_ids == ("A", "B", "C", "X")  # no cohort: keep all


def test_mcat_all_test_ids_unknown(tmp_path):
    d = tmp_path / "splits"
    d.mkdir()
    (d / "splits_0.csv").write_text("train,val\nA,Z1\nB,Z2\n")
    with pytest.raises(DataError, match=r"fold 0 \(.*splits_0\.csv\): no test patient after "
                                        r"dropping 2 id\(s\) not in the cohort"):
        read_splits(d, ["A", "B"])


def test_real_per_fold_tables(tmp_path):
    d = tmp_path / "splits"
    d.mkdir()
    for part in ("train", "test"):
        shutil.copy(TCGA_FIXTURES / f"TCGA_BLCA_fold0_{part}.csv", d)
    tr = pd.read_csv(d / "TCGA_BLCA_fold0_train.csv")
    te = pd.read_csv(d / "TCGA_BLCA_fold0_test.csv")
    (split,) = read_splits(d)
    assert split.fold == 0
    assert split.train_ids == tuple(sorted(tr["case_id"].unique()))
    assert split.test_ids == tuple(sorted(te["case_id"].unique()))
    # against the labelled patients (DSS): patients without a label are dropped
    ids = pd.concat([read_labels(d / "TCGA_BLCA_fold0_train.csv"),
                     read_labels(d / "TCGA_BLCA_fold0_test.csv")])["patient_id"].unique()
    (s2,) = read_splits(d, ids)
    assert set(s2.train_ids) | set(s2.test_ids) == set(ids)
    assert len(s2.train_ids) < len(split.train_ids)


def test_per_fold_tables_with_several_prefixes_need_prefix():
    with pytest.raises(DataError, match=r"several prefixes.*TCGA_BLCA_.*TCGA_UCEC_.*prefix="):
        read_splits(TCGA_FIXTURES)
    (s,) = read_splits(TCGA_FIXTURES, prefix="TCGA_LUAD_")
    te = pd.read_csv(TCGA_FIXTURES / "TCGA_LUAD_fold0_test.csv")
    assert s.test_ids == tuple(sorted(te["case_id"].unique()))
    with pytest.raises(DataError, match="prefix 'TCGA_XXX_'"):
        read_splits(TCGA_FIXTURES, prefix="TCGA_XXX_")


def test_per_fold_missing_half(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "c_fold1_train.csv").write_text("patient_id\nA\n")
    with pytest.raises(DataError, match=r"fold 1 has c_fold1_train\.csv but no test file"):
        read_splits(d)


def test_format_detection_errors(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    with pytest.raises(DataError, match=r"no split files found \(contents: \(empty\)\)"):
        read_splits(d)
    (d / "fold_0.csv").write_text("patient_id,split\nA,train\nB,test\n")
    (d / "splits_0.csv").write_text("train,val\nA,B\n")
    with pytest.raises(DataError, match=r"several formats \(native, mcat\)"):
        read_splits(d)
    (d / "splits_0.csv").unlink()
    assert find_split_files(d)[0] == "native"
    with pytest.raises(DataError, match="split folder not found"):
        read_splits(tmp_path / "nope")


# ------------------------------------------------------------------ load_or_create --------


def _cohort(make_cohort, n=25):
    specs = [PatientSpec(f"P{i:02d}", float(37 * i % 900 + 1), int(i % 3 == 0), [2])
             for i in range(n)]
    return Cohort.load(make_cohort("C", specs).root)


def test_load_or_create_creates_then_rereads(make_cohort, tmp_path, monkeypatch):
    c = _cohort(make_cohort)
    out = tmp_path / "runs" / "C" / "splits"
    first = load_or_create_splits(c, out, k=5, seed=3)
    assert sorted(p.name for p in out.iterdir()) == [
        "fold_0.csv", "fold_1.csv", "fold_2.csv", "fold_3.csv", "fold_4.csv",
        "splits_meta.json"]
    check_splits(first, c.patient_ids, partition=True)
    import steph.data.splits as S

    monkeypatch.setattr(S, "create_splits", lambda *a, **k: pytest.fail("re-created"))
    assert load_or_create_splits(c, out, k=5, seed=3) == first
    with pytest.raises(DataError, match=r"made with k=5, seed=3; asked for k=5, seed=4"):
        load_or_create_splits(c, out, k=5, seed=4)


def test_load_or_create_uses_the_cohorts_own_splits(make_cohort, tmp_path, caplog):
    c = _cohort(make_cohort)
    own = c.root / "splits"
    mine = create_splits(c, k=3, seed=11)
    write_splits(mine, own)
    with caplog.at_level(logging.WARNING, logger="steph.data.splits"):
        got = load_or_create_splits(c, tmp_path / "out", k=5)
    assert got == mine and not (tmp_path / "out").exists()
    assert "using its own 3 fold(s)" in caplog.text


def test_load_or_create_with_a_changed_cohort(make_cohort, tmp_path, caplog):
    c = _cohort(make_cohort)
    out = tmp_path / "out"
    first = load_or_create_splits(c, out, k=5)
    # a patient fewer (e.g. now skipped): the others keep their folds, with a log line
    c.patients = c.patients[c.patients["patient_id"] != "P24"].reset_index(drop=True)
    c.__post_init__()
    with caplog.at_level(logging.WARNING, logger="steph.data.splits"):
        fewer = load_or_create_splits(c, out, k=5)
    assert "dropped 5 id(s) not in the cohort" in caplog.text and "first: P24" in caplog.text
    for a, b in zip(first, fewer):
        assert set(a.test_ids) - {"P24"} == set(b.test_ids)
    # a new patient in no fold: the stored splits no longer fit
    extra = c.patients.iloc[:1].assign(patient_id="P99")
    c.patients = pd.concat([c.patients, extra], ignore_index=True)
    c.__post_init__()
    with pytest.raises(DataError, match=r"in no test fold: 'P99'.*do not match cohort 'C'"):
        load_or_create_splits(c, out, k=5)


@pytest.mark.parametrize("kept", [["fold_0.csv"], ["fold_0.csv", "fold_1.csv", "fold_2.csv"]])
def test_load_or_create_completes_a_write_that_was_killed(make_cohort, tmp_path, caplog, kept):
    """A process killed while writing the folds (fold files are written one by one, the meta
    last) left some of them: the next call writes them again instead of refusing the folder
    (the kill harness, tests/faults, found it: 'holds 1 fold(s), asked for k=3')."""
    c = _cohort(make_cohort)
    ref = load_or_create_splits(c, tmp_path / "ref", k=3, seed=2)
    out = tmp_path / "out"
    out.mkdir()
    for name in kept:
        shutil.copy(tmp_path / "ref" / name, out / name)
    with caplog.at_level(logging.WARNING, logger="steph.data.splits"):
        assert load_or_create_splits(c, out, k=3, seed=2) == ref
    assert "write that stopped before it finished" in caplog.text
    for name in ("fold_0.csv", "fold_1.csv", "fold_2.csv", "splits_meta.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_load_or_create_does_not_overwrite_other_split_files(make_cohort, tmp_path):
    """Fold files without a meta that steph would not have written (other folds, another
    seed) are read and checked as before, never replaced."""
    c = _cohort(make_cohort)
    out = tmp_path / "out"
    write_splits(create_splits(c, k=3, seed=7)[:1], out)  # fold 0 of another seed
    theirs = (out / "fold_0.csv").read_bytes()
    with pytest.raises(DataError, match=r"holds 1 fold\(s\), asked for k=3"):
        load_or_create_splits(c, out, k=3, seed=2)
    assert (out / "fold_0.csv").read_bytes() == theirs
