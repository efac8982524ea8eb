"""Curated datasets: taxonomy, validation + quarantine, leakage, replay split, atomic writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from roadloop.data import datasets as ds
from roadloop.data.datasets import (
    LabelledFrame,
    SourceSpec,
    Taxonomy,
    build_curated_dataset,
    default_sources,
    load_taxonomy,
    make_synthetic_dataset,
    write_data_yaml,
)
from roadloop.data.splits import is_replay_frame
from roadloop.errors import EmptyDatasetError, InvalidInputError, MissingDataError
from roadloop.settings import Settings

from .helpers import SHARED_DIR, needs_shared, synthetic_jpeg

DATASETS = SHARED_DIR / "datasets"
needs_real_sources = needs_shared(DATASETS / "atl_v2", DATASETS / "manaus_v4")


def make_source(
    root: Path, names: dict[int, str], frames: dict[str, list[tuple[str, bytes, str | None]]]
) -> Path:
    """Write a YOLO source folder: frames[split] = [(stem, image bytes, label text or None)]."""
    for split in ("train", "val", "test"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem, data, label in frames.get(split, []):
            (root / "images" / split / f"{stem}.jpg").write_bytes(data)
            if label is not None:
                (root / "labels" / split / f"{stem}.txt").write_text(label)
    doc = {"train": "images/train", "val": "images/val", "test": "images/test", "names": names}
    (root / "data.yaml").write_text(yaml.safe_dump(doc))
    return root


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def quarantine(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


CAM_TAX = Taxonomy(classes=["car", "truck"], sources={"cam": {"car": "car", "lorry": "truck"}})
CAM_NAMES = {0: "car", 1: "lorry", 2: "tram"}  # tram is known to the source, not mapped


# ----------------------------------------------------------------------------- taxonomy


def test_taxonomy_maps_both_shared_sources():
    tax = load_taxonomy()
    assert tax.classes == ["car", "truck", "bus", "two_wheeler", "person"]
    assert tax.target_id("atl_v2", "bike") == 3
    assert tax.target_id("atl_v2", "bus") == 2
    assert tax.target_id("atl_v2", "car") == 0
    assert tax.target_id("atl_v2", "truck") == 1
    assert tax.target_id("manaus_v4", "biker") == 3
    assert tax.target_id("manaus_v4", "cyclist") == 3
    assert tax.target_id("manaus_v4", "people") == 4
    assert tax.target_id("manaus_v4", "truck") == 1
    assert tax.target_id("manaus_v4", "bus") is None  # manaus has no bus class
    assert tax.target_id("nowhere", "car") is None


@needs_real_sources
def test_every_shared_source_class_is_mapped():
    tax = load_taxonomy()
    for name in ("atl_v2", "manaus_v4"):
        for cls in SourceSpec(name=name, root=DATASETS / name).class_names().values():
            assert tax.target_id(name, cls) is not None, (name, cls)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("classes: [car]\nsources:\n  s: {bike: two_wheeler}\n", "two_wheeler"),
        ("classes: [car]\n", "sources"),
        ("sources: {}\n", "classes"),
        ("classes: [car, car]\nsources: {}\n", "more than once"),
        ("classes: [car\n", "YAML"),
        ("- just a list\n", "mapping"),
    ],
)
def test_malformed_taxonomy_names_file_and_problem(tmp_path, text, needle):
    p = tmp_path / "tax.yaml"
    p.write_text(text)
    with pytest.raises(InvalidInputError) as err:
        load_taxonomy(p)
    assert err.value.path == p
    assert str(p) in str(err.value) and needle in str(err.value)


def test_missing_taxonomy_file(tmp_path):
    with pytest.raises(MissingDataError, match="tax.yaml"):
        load_taxonomy(tmp_path / "tax.yaml")


# ----------------------------------------------------------------------------- validation


def test_bad_frames_and_rows_are_quarantined_and_a_frame_with_a_bad_row_goes_whole(tmp_path):
    good = synthetic_jpeg(1)
    lines = [
        "0 0.5 0.5 0.2 0.2",  # 1 ok car
        "1 0.3 0.3 0.1 0.1",  # 2 ok lorry -> truck (id 1)
        "0 1.5 0.5 0.2 0.2",  # 3 out of range
        "7 0.5 0.5 0.2 0.2",  # 4 unknown class id
        "0 0.5 0.5 0.2",  # 5 malformed: 4 fields
        "car 0.5 0.5 0.2 0.2",  # 6 malformed: non-numeric
        "0 0.5 0.5 0.0 0.2",  # 7 zero width
        "2 0.5 0.5 0.2 0.2",  # 8 tram: not in taxonomy
        "",  # blank lines are ignored
        "1.5 0.5 0.5 0.2 0.2",  # 10 fractional class id
        "0 0.9000001 0.5 0.2 0.2",  # 11 float noise at the edge: valid
    ]
    rows = "\n".join(lines)
    # A frame whose rows are all valid, one past the edge by float noise: kept, clipped.
    clean = "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n0 0.9000001 0.5 0.2 0.2\n"
    src = make_source(
        tmp_path / "cam",
        CAM_NAMES,
        {
            "train": [
                ("mixed", good, rows),
                ("good", synthetic_jpeg(6), clean),
                (
                    "corrupt",
                    b"\xff\xd8\xff\xe0" + b"garbage" * 50 + b"\xff\xd9",
                    "0 0.5 0.5 0.1 0.1",
                ),
                ("truncated", synthetic_jpeg(2)[: len(synthetic_jpeg(2)) // 2],
                 "0 0.5 0.5 0.1 0.1"),
                ("empty", b"", None),
                ("background", synthetic_jpeg(3), None),
                ("badlabels", synthetic_jpeg(4), None),
            ],
            "val": [("v", synthetic_jpeg(5), "0 0.5 0.5 0.1 0.1")],
        },
    )
    (src / "labels/train/badlabels.txt").write_bytes(b"\xff\xfe\x00bad utf8")
    out = tmp_path / "out"
    res = build_curated_dataset(
        [SourceSpec(name="cam", root=src)], out, CAM_TAX, replay_fraction=0.0, progress=False
    )

    assert res.quarantine_reasons == {
        "class not in taxonomy": 1,
        "coordinates out of range": 1,
        "corrupt image": 2,
        "frame with rejected label rows": 1,
        "malformed row": 3,
        "non-positive box size": 1,
        "truncated image": 1,
        "unknown class id": 1,
        "unreadable label file": 1,
    }
    assert res.quarantined == 12
    assert res.frames_quarantined == 5  # mixed, corrupt, truncated, empty, badlabels
    assert res.split_counts == {"train": 2, "val": 1, "test": 0}  # good + background
    assert res.class_counts["train"] == {"car": 2, "truck": 1}
    # The frame with rejected rows goes whole: its rejected objects are not taught as background.
    assert not (out / "labels/train/cam__mixed.txt").exists()
    assert not (out / "images/train/cam__mixed.jpg").exists()
    assert (out / "labels/train/cam__good.txt").read_text().splitlines() == [
        "0 0.500000 0.500000 0.200000 0.200000",
        "1 0.300000 0.300000 0.100000 0.100000",
        "0 0.900000 0.500000 0.200000 0.200000",
    ]
    assert (out / "labels/train/cam__background.txt").read_text() == ""
    rows_q = {q["line"]: q for q in quarantine(out) if q["file"].endswith("mixed.txt")}
    assert sorted(rows_q) == [3, 4, 5, 6, 7, 8, 10]
    assert rows_q[4]["reason"] == "unknown class id" and "7" in rows_q[4]["detail"]
    frames_q = {Path(q["file"]).stem: q["reason"] for q in quarantine(out) if q["line"] is None}
    assert frames_q == {
        "mixed": "frame with rejected label rows",
        "corrupt": "corrupt image",
        "truncated": "truncated image",
        "empty": "corrupt image",
        "badlabels": "unreadable label file",
    }
    m = {r["file"]: r for r in manifest(out)}
    assert "images/train/cam__mixed.jpg" not in m
    assert m["images/train/cam__good.jpg"]["n_boxes"] == 3
    assert m["images/train/cam__good.jpg"]["n_rows_quarantined"] == 0
    assert not (out / "images/train/cam__corrupt.jpg").exists()
    md = (out / "quarantine.md").read_text()
    assert "truncated image" in md and "mixed.txt" in md
    # Inputs are never modified.
    assert (src / "images/train/corrupt.jpg").exists()


def test_unmapped_source_is_a_clear_error(tmp_path):
    src = make_source(
        tmp_path / "other", {0: "car"}, {"train": [("a", synthetic_jpeg(), "0 .5 .5 .1 .1")]}
    )
    with pytest.raises(InvalidInputError, match="no class map"):
        build_curated_dataset(
            [SourceSpec(name="other", root=src)], tmp_path / "out", CAM_TAX, 0.0, progress=False
        )


def test_empty_dataset_error_leaves_existing_output_untouched(tmp_path):
    src = make_source(
        tmp_path / "cam",
        CAM_NAMES,
        {
            "train": [("t", synthetic_jpeg(), "0 .5 .5 .1 .1")],
            "val": [("v", b"not an image", None)],
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous dataset")
    with pytest.raises(EmptyDatasetError) as err:
        build_curated_dataset([SourceSpec(name="cam", root=src)], out, CAM_TAX, 0.0, progress=False)
    assert "val" in str(err.value) and "corrupt image" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_no_sources_is_empty_dataset(tmp_path):
    with pytest.raises(EmptyDatasetError, match="train and val"):
        build_curated_dataset([], tmp_path / "out", CAM_TAX, 0.0, progress=False)


def test_missing_source_folder_and_data_yaml_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(MissingDataError, match=str(missing)) as err:
        build_curated_dataset(
            [SourceSpec(name="cam", root=missing)], tmp_path / "out", CAM_TAX, 0.0, progress=False
        )
    assert err.value.path == missing
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(MissingDataError, match=str(bare / "data.yaml")):
        SourceSpec(name="cam", root=bare).class_names()
    with pytest.raises(MissingDataError, match=str(tmp_path / "noshare")):
        default_sources(Settings(shared_dir=tmp_path / "noshare", home=tmp_path / "home"))


def test_source_names_as_list_and_dict(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / "data.yaml").write_text("names: [a, b]\n")
    assert SourceSpec(name="s", root=root).class_names() == {0: "a", 1: "b"}
    (root / "data.yaml").write_text("names: {0: a, 3: d}\n")
    assert SourceSpec(name="s", root=root).class_names() == {0: "a", 3: "d"}
    (root / "data.yaml").write_text("nc: 2\n")
    with pytest.raises(InvalidInputError, match="names"):
        SourceSpec(name="s", root=root).class_names()


# ----------------------------------------------------------------------------- splits


def test_replay_frames_excluded_and_val_test_all_kept(tmp_path):
    spec = make_synthetic_dataset(tmp_path / "syn", n_train=20, n_val=5, n_test=4, imgsz=64, seed=3)
    frac = 0.5
    res = build_curated_dataset([spec], tmp_path / "out", load_taxonomy(), frac, progress=False)
    rows = manifest(tmp_path / "out")
    train_stems = {Path(r["original"]).stem for r in rows if r["split"] == "train"}
    all_train = {p.stem for p in (spec.root / "images/train").iterdir()}
    expected = {s for s in all_train if not is_replay_frame("synthetic", "train", s, frac)}
    assert train_stems == expected
    assert 0 < len(expected) < len(all_train)
    assert res.skipped_replay == len(all_train) - len(expected)
    assert res.split_counts == {"train": len(expected), "val": 5, "test": 4}
    assert res.source_counts == {"synthetic": res.split_counts}


def test_max_frames_per_split_caps_each_source_split(tmp_path):
    spec = make_synthetic_dataset(tmp_path / "syn", n_train=10, n_val=4, n_test=3, imgsz=64)
    res = build_curated_dataset(
        [spec], tmp_path / "out", load_taxonomy(), 0.0, progress=False, max_frames_per_split=2
    )
    assert res.split_counts == {"train": 2, "val": 2, "test": 2}


def test_duplicate_image_kept_in_highest_priority_split(tmp_path):
    dup = synthetic_jpeg(42)
    src = make_source(
        tmp_path / "cam",
        CAM_NAMES,
        {
            "train": [
                ("a", synthetic_jpeg(1), None),
                ("dup_tr", dup, "0 .5 .5 .1 .1"),
                ("a2", synthetic_jpeg(1), None),
            ],
            "val": [("v", synthetic_jpeg(2), None), ("dup_va", dup, None)],
            "test": [("dup_te", dup, None)],
        },
    )
    res = build_curated_dataset(
        [SourceSpec(name="cam", root=src)], tmp_path / "out", CAM_TAX, 0.0, progress=False
    )
    rows = manifest(tmp_path / "out")
    shas: dict[str, set[str]] = {}
    for r in rows:
        shas.setdefault(r["sha256"], set()).add(r["split"])
    assert all(len(s) == 1 for s in shas.values())
    assert [
        Path(r["original"]).stem for r in rows if Path(r["original"]).stem.startswith("dup")
    ] == ["dup_te"]
    assert res.quarantine_reasons == {"duplicate across splits": 2, "duplicate within split": 1}
    assert res.split_counts == {"train": 1, "val": 1, "test": 1}


def test_extra_frames_use_taxonomy_ids_and_skip_replay_filter(tmp_path):
    spec = make_synthetic_dataset(tmp_path / "syn", n_train=4, n_val=2, n_test=0, imgsz=64)
    tax = load_taxonomy()
    # A stem the replay filter would reserve: extra frames come back from replay, so keep it.
    stem = next(f"f{i}" for i in range(1000) if is_replay_frame("cam7", "train", f"f{i}", 0.5))
    (tmp_path / "ext").mkdir()
    img = tmp_path / "ext" / f"{stem}.jpg"
    img.write_bytes(synthetic_jpeg(9))
    lbl = tmp_path / "ext" / f"{stem}.txt"
    lbl.write_text("4 0.5 0.5 0.1 0.3\n")
    bad = tmp_path / "ext" / "bad.jpg"
    bad.write_bytes(b"junk")
    # Taxonomy id 9 does not exist: the row is rejected and its frame goes whole.
    (tmp_path / "ext" / "odd.jpg").write_bytes(synthetic_jpeg(10))
    (tmp_path / "ext" / "odd.txt").write_text("4 0.5 0.5 0.1 0.3\n9 0.5 0.5 0.1 0.1\n")
    extra = [
        LabelledFrame(image=img, label=lbl, source="cam7", split="train"),
        LabelledFrame(image=bad, label=None, source="cam7", split="train"),
        LabelledFrame(image=tmp_path / "ext" / "odd.jpg", label=tmp_path / "ext" / "odd.txt",
                      source="cam7", split="train"),
    ]
    res = build_curated_dataset(
        [spec], tmp_path / "out", tax, 0.5, extra_frames=extra, progress=False
    )
    out = tmp_path / "out"
    assert (
        out / f"labels/train/cam7__{stem}.txt"
    ).read_text() == "4 0.500000 0.500000 0.100000 0.300000\n"
    assert res.source_counts["cam7"]["train"] == 1
    assert res.quarantine_reasons == {
        "unknown class id": 1, "frame with rejected label rows": 1, "corrupt image": 1,
    }


# ----------------------------------------------------------------------------- output


def test_failed_build_leaves_previous_dataset_and_no_temp(tmp_path, monkeypatch):
    spec = make_synthetic_dataset(tmp_path / "syn", n_train=4, n_val=2, n_test=1, imgsz=64)
    out = tmp_path / "data" / "curated"
    first = build_curated_dataset([spec], out, load_taxonomy(), 0.0, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def boom(root: Path, *a, **k):
        (root / "images").mkdir(parents=True)
        (root / "images" / "half.jpg").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(ds, "_write_dataset", boom)
    with pytest.raises(OSError, match="disk full"):
        build_curated_dataset([spec], out, load_taxonomy(), 0.0, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert [p.name for p in out.parent.iterdir()] == ["curated"]
    monkeypatch.undo()
    # A successful rebuild replaces the folder and leaves nothing aside.
    second = build_curated_dataset([spec], out, load_taxonomy(), 0.0, progress=False)
    assert second.split_counts == first.split_counts
    assert [p.name for p in out.parent.iterdir()] == ["curated"]


def test_output_layout_and_data_yaml_work_with_ultralytics(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    spec = make_synthetic_dataset(tmp_path / "syn", n_train=4, n_val=2, n_test=2, imgsz=64)
    syn_doc = yaml.safe_load((spec.root / "data.yaml").read_text())
    assert syn_doc["synthetic"] is True and "SYNTHETIC" in (spec.root / "data.yaml").read_text()
    out = tmp_path / "cur"
    res = build_curated_dataset([spec], out, load_taxonomy(), 0.0, progress=False)
    for name in (
        "data.yaml",
        "manifest.jsonl",
        "quarantine.jsonl",
        "quarantine.md",
        "summary.json",
    ):
        assert (out / name).is_file()
    doc = yaml.safe_load((out / "data.yaml").read_text())
    assert "path" not in doc and doc["names"] == dict(enumerate(res.class_names))
    assert len(list((out / "images/train").glob("synthetic__*.jpg"))) == res.split_counts["train"]
    abs_yaml = write_data_yaml(out, tmp_path / "run" / "data.yaml")
    assert yaml.safe_load(abs_yaml.read_text())["path"] == str(out)

    from ultralytics.data.utils import check_det_dataset

    for y in (out / "data.yaml", abs_yaml):
        data = check_det_dataset(str(y), autodownload=False)
        assert Path(data["train"]) == out / "images" / "train"
        assert data["nc"] == 5


# ----------------------------------------------------------------------------- real data


@needs_real_sources
def test_build_on_small_real_subset(tmp_path):
    specs = []
    for name in ("atl_v2", "manaus_v4"):
        src, dst = DATASETS / name, tmp_path / name
        for split in ("train", "val", "test"):
            (dst / "images" / split).mkdir(parents=True)
            (dst / "labels" / split).mkdir(parents=True)
            for img in sorted((src / "images" / split).iterdir())[:2]:
                shutil.copy(img, dst / "images" / split / img.name)
                lbl = src / "labels" / split / f"{img.stem}.txt"
                if lbl.exists():
                    shutil.copy(lbl, dst / "labels" / split / lbl.name)
        shutil.copy(src / "data.yaml", dst / "data.yaml")
        specs.append(SourceSpec(name=name, root=dst))
    tax = load_taxonomy()
    res = build_curated_dataset(specs, tmp_path / "out", tax, 0.0, progress=False)
    assert res.split_counts == {"train": 4, "val": 4, "test": 4}
    assert res.quarantined == 0
    # Every source box arrives, renumbered into the taxonomy.
    for row in manifest(tmp_path / "out"):
        src_names = SourceSpec(name=row["source"], root=tmp_path / row["source"]).class_names()
        orig = [
            l.split() for l in Path(row["original_label"]).read_text().splitlines() if l.strip()
        ]
        new = [l.split() for l in (tmp_path / "out" / row["label"]).read_text().splitlines()]
        assert len(orig) == len(new) == row["n_boxes"]
        for o, n in zip(orig, new):
            assert int(n[0]) == tax.target_id(row["source"], src_names[int(o[0])])
            assert np.allclose([float(v) for v in o[1:]], [float(v) for v in n[1:]], atol=1e-6)


@needs_real_sources
def test_full_shared_build_accounts_for_every_frame(tmp_path):
    specs = default_sources(Settings(shared_dir=SHARED_DIR, home=tmp_path / "home"))
    assert [s.name for s in specs] == ["atl_v2", "manaus_v4"]
    res = build_curated_dataset(specs, tmp_path / "out", load_taxonomy(), 0.3, progress=False)
    total = sum(len(s.frames()) for s in specs)
    assert sum(res.split_counts.values()) + res.skipped_replay + res.frames_quarantined == total
    assert res.quarantined == res.frames_quarantined  # no bad row or orphan in the shared data
    assert res.split_counts["val"] == 31 + 80 and res.split_counts["test"] == 19 + 50
    shas = [r["sha256"] for r in manifest(tmp_path / "out")]
    assert len(shas) == len(set(shas))


def test_a_bom_keeps_row_one_and_a_nan_row_says_so(tmp_path):
    """Found by an audit: a label file written with a UTF-8 BOM lost its first (valid) row as
    "non-numeric", and a NaN coordinate was reported as a non-integer class id."""
    src = make_source(tmp_path / "cam", CAM_NAMES, {
        "train": [("bom", synthetic_jpeg(1), "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1"),
                  ("nan", synthetic_jpeg(2), "0 nan 0.5 0.1 0.1\n0 0.5 0.5 0.2 0.2")],
        "val": [("v", synthetic_jpeg(5), "0 0.5 0.5 0.1 0.1")]})
    bom = src / "labels/train/bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())
    out = tmp_path / "out"
    build_curated_dataset([SourceSpec(name="cam", root=src)], out, CAM_TAX,
                          replay_fraction=0.0, progress=False)
    assert len((out / "labels/train/cam__bom.txt").read_text().splitlines()) == 2
    rows = {Path(q["file"]).stem: q for q in quarantine(out) if q["line"] is not None}
    assert set(rows) == {"nan"} and "finite number" in rows["nan"]["detail"]
