"""Curation leftovers found by an audit, and the export-shape setting.

- a frame with some label rows rejected kept its other rows, so the rejected objects were
  learnt as background: such a frame now goes whole (its row reasons kept in quarantine);
- a box running past the image edge was kept unclipped however far it ran: rounding noise
  (a pixel or so) is clipped, a gross overshoot is a bad row;
- label files with no image were ignored without a word: they are counted and named;
- ROADLOOP_EXPORT_SHAPES=foo failed only when the Dagster definitions loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from roadloop.data.datasets import LabelledFrame, SourceSpec, build_curated_dataset, check_frame
from roadloop.settings import Settings

from .helpers import SHARED_DIR, needs_shared, synthetic_jpeg
from .test_datasets import CAM_NAMES, CAM_TAX, make_source, manifest, quarantine

W, H = 320, 160  # a size the 1/4-scale decode measures exactly


def _img(seed: int) -> bytes:
    return synthetic_jpeg(seed, (W, H))


def _build(tmp_path: Path, train: list, val: list | None = None):
    src = make_source(tmp_path / "cam", CAM_NAMES, {
        "train": train, "val": val or [("v", _img(99), "0 0.5 0.5 0.1 0.1")]})
    out = tmp_path / "out"
    res = build_curated_dataset([SourceSpec(name="cam", root=src)], out, CAM_TAX,
                                replay_fraction=0.0, progress=False)
    return src, out, res


# ----------------------------------------------------------------------- frames go whole


@pytest.mark.parametrize(("bad_row", "reason"), [
    ("0 0.5 0.5 0.2", "malformed row"),
    ("7 0.5 0.5 0.1 0.1", "unknown class id"),
    ("2 0.5 0.5 0.1 0.1", "class not in taxonomy"),  # tram: the source's, not mapped
    ("0 0.5 0.5 0.0 0.1", "non-positive box size"),
    ("0 0.98 0.5 0.2 0.2", "coordinates out of range"),  # half the box outside the image
])
def test_a_frame_with_a_rejected_row_is_left_out_whole(tmp_path, bad_row, reason):
    valid = "0 0.3 0.5 0.1 0.2"
    src, out, res = _build(tmp_path, [
        ("mixed", _img(1), f"{valid}\n{bad_row}\n"),
        ("good", _img(2), f"{valid}\n1 0.6 0.5 0.1 0.1\n"),
    ])
    # Not one row of the mixed frame trains: its other objects would be taught as background.
    kept = {Path(m["original"]).stem for m in manifest(out)}
    assert kept == {"good", "v"}
    assert not (out / "labels/train/cam__mixed.txt").exists()
    assert res.split_counts == {"train": 1, "val": 1, "test": 0}
    assert res.class_counts["train"] == {"car": 1, "truck": 1}  # the good frame's only
    # Nothing is lost: the row's reason and line, and the frame's exclusion, are recorded.
    records = quarantine(out)
    rows = [r for r in records if r["line"] is not None]
    assert [(Path(r["file"]).name, r["line"], r["reason"]) for r in rows] == [
        ("mixed.txt", 2, reason)]
    frames = [r for r in records if r["line"] is None]
    assert [(Path(r["file"]).name, r["reason"]) for r in frames] == [
        ("mixed.jpg", "frame with rejected label rows")]
    assert "1 of 2" in frames[0]["detail"] and "background" in frames[0]["detail"]
    assert res.quarantine_reasons == {reason: 1, "frame with rejected label rows": 1}
    assert res.quarantined == len(records) == 2
    # Counts stay consistent: every source frame is kept or accounted for.
    assert res.frames_quarantined == 1
    total = sum(1 for _ in src.glob("images/*/*.jpg"))
    assert sum(res.split_counts.values()) + res.frames_quarantined + res.skipped_replay == total
    # The inputs are untouched.
    assert (src / "labels/train/mixed.txt").read_text() == f"{valid}\n{bad_row}\n"


def test_check_frame_returns_no_frame_for_a_rejected_row(tmp_path):
    """The rule lives in check_frame, so the federated sites and the review export share it."""
    (tmp_path / "a.jpg").write_bytes(_img(3))
    (tmp_path / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n9 0.5 0.5 0.1 0.1\n")
    frame = LabelledFrame(image=tmp_path / "a.jpg", label=tmp_path / "a.txt", source="r",
                          split="train")
    checked, records = check_frame(frame, CAM_TAX, 0)
    assert checked is None
    assert [(r.line, r.reason) for r in records] == [
        (None, "frame with rejected label rows"), (2, "unknown class id")]


# ----------------------------------------------------------------------- the image edge


def _edges(label_text: str) -> list[tuple[float, float, float, float]]:
    out = []
    for line in label_text.splitlines():
        _, x, y, w, h = (float(v) for v in line.split())
        out.append((x - w / 2, x + w / 2, y - h / 2, y + h / 2))
    return out


def test_rounding_overshoot_is_clipped_and_a_gross_one_is_a_bad_row(tmp_path):
    px, py = 1 / W, 1 / H
    near = [
        f"0 {1 - 0.05 + px:.6f} 0.5 0.1 0.2",  # right edge 1 px past the border
        f"0 {0.05 - px:.6f} 0.5 0.1 0.2",  # left edge 1 px before 0
        f"1 0.5 {1 - 0.1 + py:.6f} 0.2 0.2",  # bottom edge 1 px past
    ]
    _, out, res = _build(tmp_path, [
        ("near", _img(4), "\n".join(near) + "\n"),
        ("far", _img(5), f"0 0.5 0.5 0.1 0.1\n0 {1 - 0.05 + 3 * px:.6f} 0.5 0.1 0.2\n"),
    ])
    # Within rounding: kept, and clipped to the image (no edge outside [0, 1]).
    edges = _edges((out / "labels/train/cam__near.txt").read_text())
    assert len(edges) == 3
    for x0, x1, y0, y1 in edges:
        assert -1e-6 <= x0 < x1 <= 1 + 1e-6 and -1e-6 <= y0 < y1 <= 1 + 1e-6
    assert edges[0][1] == pytest.approx(1.0, abs=1e-6)
    assert edges[0][0] == pytest.approx(0.9 + px, abs=1e-5)  # the inner edge did not move
    assert edges[1][0] == pytest.approx(0.0, abs=1e-6)
    assert edges[2][3] == pytest.approx(1.0, abs=1e-6)
    # Three pixels out, twice the tolerance: a wrong label, not rounding. The row is
    # rejected, so its frame goes whole.
    assert not (out / "labels/train/cam__far.txt").exists()
    far = [r for r in quarantine(out) if r["file"].endswith("far.txt")]
    assert [(r["line"], r["reason"]) for r in far] == [(2, "coordinates out of range")]
    assert "px past the image edge" in far[0]["detail"]
    assert res.split_counts["train"] == 1 and res.frames_quarantined == 1


def test_edge_tolerance_is_a_pixel_or_so():
    from roadloop.data.label_checks import EDGE_TOLERANCE_PX

    assert 1.0 <= EDGE_TOLERANCE_PX <= 2.0


@needs_shared(SHARED_DIR / "datasets" / "atl_v2", SHARED_DIR / "datasets" / "manaus_v4")
def test_the_reference_data_loses_no_row_to_the_edge_check():
    """atl_v2 has 8 rows past the edge by float rounding (< 0.01 px): clipped, never rejected."""
    from roadloop.data.datasets import load_taxonomy

    tax = load_taxonomy()
    rejected, overshooting, kept_rows = [], 0, []
    for name in ("atl_v2", "manaus_v4"):
        for i, frame in enumerate(SourceSpec(name=name, root=SHARED_DIR / "datasets" / name)
                                  .frames()):
            checked, records = check_frame(frame, tax, i)
            rejected += [(r.file, r.line, r.reason) for r in records]
            if checked is not None and Path(frame.label).exists():
                raw = _edges(Path(frame.label).read_text(encoding="utf-8-sig").strip())
                overshooting += sum(1 for e in raw if min(e) < 0 or max(e) > 1)
                kept_rows += [(x, y, w, h) for _, x, y, w, h in checked.rows]
    assert rejected == []
    assert overshooting > 0  # the case this guards is in the data
    eps = 1e-12  # float arithmetic of the clip, not a tolerance
    for x, y, w, h in kept_rows:  # ... and every kept box lies within the image
        assert x - w / 2 >= -eps and x + w / 2 <= 1 + eps
        assert y - h / 2 >= -eps and y + h / 2 <= 1 + eps


# ----------------------------------------------------------------------- orphan labels


def test_label_files_without_an_image_are_counted_and_named(tmp_path):
    src = make_source(tmp_path / "cam", CAM_NAMES, {
        "train": [("a", _img(6), "0 0.5 0.5 0.1 0.1")],
        "val": [("v", _img(7), "0 0.5 0.5 0.1 0.1")],
    })
    (src / "labels/train/lost_frame.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (src / "labels/val/renamed.txt").write_text("1 0.5 0.5 0.1 0.1\n")
    (src / "labels/test").mkdir(exist_ok=True)
    (src / "labels/train/classes.txt").write_text("car\nlorry\ntram\n")  # LabelImg's list
    out = tmp_path / "out"
    res = build_curated_dataset([SourceSpec(name="cam", root=src)], out, CAM_TAX,
                                replay_fraction=0.0, progress=False)
    assert res.orphan_labels == 2
    assert sorted(Path(p).name for p in res.orphan_label_examples) == [
        "lost_frame.txt", "renamed.txt"]
    orphans = [r for r in quarantine(out) if r["reason"] == "label file without image"]
    assert sorted((Path(r["file"]).name, r["split"]) for r in orphans) == [
        ("lost_frame.txt", "train"), ("renamed.txt", "val")]
    assert "label file(s) match no image" in (out / "quarantine.md").read_text()
    assert res.quarantine_reasons == {"label file without image": 2}
    # Orphans are no frames: the kept frames and the frame count are unchanged.
    assert res.split_counts == {"train": 1, "val": 1, "test": 0}
    assert res.frames_quarantined == 0
    assert (src / "labels/train/lost_frame.txt").exists()  # inputs untouched


def test_orphan_examples_are_capped_but_every_orphan_is_recorded(tmp_path):
    src = make_source(tmp_path / "cam", CAM_NAMES, {
        "train": [("a", _img(6), None)], "val": [("v", _img(7), None)]})
    for i in range(12):
        (src / f"labels/train/gone{i:02d}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    out = tmp_path / "out"
    res = build_curated_dataset([SourceSpec(name="cam", root=src)], out, CAM_TAX,
                                replay_fraction=0.0, progress=False)
    assert res.orphan_labels == 12
    assert 0 < len(res.orphan_label_examples) < 12
    assert len([r for r in quarantine(out) if r["reason"] == "label file without image"]) == 12


# ----------------------------------------------------------------------- export shapes


@pytest.mark.parametrize("value", ["foo", "square,wide", "190x320", "0:9", "16/9", "square,,x"])
def test_a_bad_export_shape_stops_the_settings_load(tmp_path, monkeypatch, value):
    monkeypatch.setenv("ROADLOOP_EXPORT_SHAPES", value)
    with pytest.raises(ValidationError) as err:
        Settings(home=tmp_path)
    text = str(err.value)
    assert "export_shapes" in text and "ROADLOOP_EXPORT_SHAPES" in text


@pytest.mark.parametrize("spec", [
    "square", "SQUARE", " 16:9 ", "4:3", "9:16", "1.5:1", "192x320", "192X320", "192×320",
    "190x320", "0:9", "9:0", "0x32", "foo", "16/9", "x320", "-32x32", "",
])
def test_settings_and_parse_shape_agree_on_every_spec(tmp_path, spec):
    """The settings check the grammar alone (roadloop.models.shape_specs) without the export
    code; whatever they accept parse_shape turns into a shape, and the reverse."""
    from roadloop.models.shapes import parse_shape

    try:
        parse_shape(spec, 320)
        parses = True
    except ValueError:
        parses = False
    try:
        Settings(home=tmp_path, export_shapes=[spec])
        loads = True
    except ValidationError:
        loads = False
    assert loads == parses, spec


def test_good_export_shapes_still_load(tmp_path, monkeypatch):
    monkeypatch.setenv("ROADLOOP_EXPORT_SHAPES", "square, 16:9,224x416")
    assert Settings(home=tmp_path).export_shapes == ["square", "16:9", "224x416"]


@pytest.mark.parametrize(("kept", "quarantined", "passed"), [(95, 5, True), (94, 6, False)])
def test_quarantine_rate_check_counts_frames(tmp_path: Path, kept: int, quarantined: int,
                                             passed: bool) -> None:
    """The asset check's share is of frames (a frame with a bad row goes whole), not of
    quarantine records, which also count each rejected row and orphan label file."""
    from assets.datasets import curated_dataset_quarantine_rate
    from assets.records import CuratedDatasetVersion
    from roadloop.data.datasets import CuratedDataset
    from roadloop.data.versioning import DatasetVersion

    ds = CuratedDataset(path=tmp_path, class_names=["car"], split_counts={"train": kept},
                        class_counts={"train": {"car": 3 * kept}}, source_counts={},
                        quarantined=40 * quarantined, quarantine_reasons={}, skipped_replay=0,
                        frames_quarantined=quarantined, orphan_labels=2)
    version = DatasetVersion(md5="0" * 32, nfiles=1, size=1, dvc_file=tmp_path / "x.dvc",
                             remote_url="file:///x")
    result = curated_dataset_quarantine_rate(CuratedDatasetVersion(
        dataset=ds, version=version, data_yaml=tmp_path / "data.yaml"))
    assert result.passed is passed
    assert result.metadata["frames_quarantined"].value == quarantined
