"""Camera-site datasets for federated training (roadloop.federation.sites)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from roadloop.data.datasets import load_taxonomy
from roadloop.errors import EmptyDatasetError
from roadloop.federation.sites import (
    SitePlan,
    build_site_datasets,
    centralized_dataset,
    group_sources,
    source_prefix,
)

from .helpers import encode_jpeg

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _site_root(data_yaml: Path) -> Path:
    return Path(yaml.safe_load(Path(data_yaml).read_text(encoding="utf-8"))["path"])


def _images(root: Path, split: str) -> list[Path]:
    return sorted(p for p in (root / "images" / split).iterdir() if p.suffix in IMAGE_SUFFIXES)


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> label text / image size (the folder's content, for comparisons)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".cache" not in p.name:
            rel = str(p.relative_to(root))
            out[rel] = p.read_text(encoding="utf-8") if p.suffix == ".txt" else str(p.stat().st_size)
    return out


@pytest.fixture(scope="module")
def built(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SitePlan, Path]:
    out = tmp_path_factory.mktemp("sites")
    return build_site_datasets(shared_dir / "datasets", out, manaus_sites=3, min_frames=10), out


# --------------------------------------------------------------------------- units


def test_source_prefix_strips_the_frame_number_and_export_tail() -> None:
    assert source_prefix("abqlou105_jpg") == "abqlou"
    assert source_prefix("accident_frame434_jpg") == "accident_frame"
    assert source_prefix("frame12_jpg") == "frame"
    assert source_prefix("stmarc_video_frame1633_jpg") == "stmarc_video_frame"
    assert source_prefix("no_number") == "no_number"
    assert source_prefix("1234_png") == "1234"


def test_group_sources_gives_big_sources_their_own_site_and_balances_the_rest() -> None:
    counts = {"frame": 90, **{f"cam{i:02d}": 3 + i % 5 for i in range(40)}}
    groups = group_sources(counts, 3)
    assert groups == group_sources(dict(reversed(counts.items())), 3)  # order-independent
    assert groups["frame"] == "manaus_frame"
    assert set(groups.values()) == {"manaus_frame", "manaus_mix1", "manaus_mix2"}
    sizes = Counter()
    for prefix, site in groups.items():
        sizes[site] += counts[prefix]
    # largest-first onto the emptiest: the two packed sites differ by at most one source
    assert abs(sizes["manaus_mix1"] - sizes["manaus_mix2"]) <= 7
    # k=1: one site holds everything, no source alone
    assert set(group_sources(counts, 1).values()) == {"manaus_mix1"}


# --------------------------------------------------------------------------- real data


def test_sites_are_disjoint_and_never_see_the_test_set(built: tuple[SitePlan, Path]) -> None:
    plan, _ = built
    assert {"atl_day", "atl_night"} <= {s.name for s in plan.sites}
    manaus = [s for s in plan.sites if s.name.startswith("manaus_")]
    assert 2 <= len(manaus) <= 4
    owner: dict[str, str] = {}
    shas: dict[str, str] = {}
    for spec in plan.sites:
        root = _site_root(spec.data_yaml)
        for split in ("train", "val"):
            for img in _images(root, split):
                assert img.stem not in owner, f"{img.stem} in {owner.get(img.stem)} and {spec.name}"
                owner[img.stem] = spec.name
        for row in (root / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
            sha = json.loads(row)["sha256"]
            assert sha not in shas, f"same image content in {shas.get(sha)} and {spec.name}"
            shas[sha] = spec.name
    test_root = _site_root(plan.test_yaml)
    test_images = _images(test_root, "test")
    assert len(test_images) == plan.info["counts"]["test"]["test"] > 0
    assert not {p.stem for p in test_images} & set(owner)
    test_shas = {
        json.loads(r)["sha256"]
        for r in (test_root / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    }
    assert not test_shas & set(shas)
    # a Manaus camera prefix lives in one site only
    site_of_prefix: dict[str, set[str]] = {}
    for stem, site in owner.items():
        if stem.startswith("manaus_v4__"):
            site_of_prefix.setdefault(source_prefix(stem.split("__", 1)[1]), set()).add(site)
    assert site_of_prefix and all(len(s) == 1 for s in site_of_prefix.values())


def test_site_labels_are_taxonomy_ids_and_sites_have_enough_frames(
    built: tuple[SitePlan, Path],
) -> None:
    plan, _ = built
    nc = len(load_taxonomy().classes)
    for spec in plan.sites:
        root = _site_root(spec.data_yaml)
        doc = yaml.safe_load(spec.data_yaml.read_text(encoding="utf-8"))
        assert Path(doc["path"]).is_absolute()
        assert list(doc["names"].values()) == load_taxonomy().classes
        assert spec.frames == len(_images(root, "train")) >= 10
        assert len(_images(root, "val")) >= 1
        assert spec.quality == 1.0  # the shared sources' labels are all valid
        for label in (root / "labels").rglob("*.txt"):
            for line in label.read_text(encoding="utf-8").splitlines():
                parts = line.split()
                assert len(parts) == 5 and 0 <= int(parts[0]) < nc, (label, line)
                assert all(0.0 <= float(v) <= 1.0 for v in parts[1:])
        assert plan.info["counts"][spec.name]["train"] == spec.frames


def test_night_site_is_darker_than_the_day_site(built: tuple[SitePlan, Path]) -> None:
    plan, _ = built

    def greys(name: str) -> list[float]:
        root = _site_root(plan.site(name).data_yaml)
        return [
            float(cv2.imread(str(p), cv2.IMREAD_REDUCED_GRAYSCALE_2).mean())
            for split in ("train", "val")
            for p in _images(root, split)
        ]

    night, day = greys("atl_night"), greys("atl_day")
    assert max(night) < min(day)
    assert np.mean(night) + 50 < np.mean(day)


def test_centralized_dataset_is_the_union_of_the_sites(
    built: tuple[SitePlan, Path], tmp_path: Path
) -> None:
    plan, _ = built
    data_yaml = centralized_dataset(plan, tmp_path / "central")
    root = _site_root(data_yaml)
    for split in ("train", "val"):
        union = {p.name for s in plan.sites for p in _images(_site_root(s.data_yaml), split)}
        assert {p.name for p in _images(root, split)} == union
    assert len(_images(root, "train")) == sum(s.frames for s in plan.sites)
    boxes = Counter(
        line.split()[0]
        for label in (root / "labels" / "train").glob("*.txt")
        for line in label.read_text(encoding="utf-8").splitlines()
    )
    classes = load_taxonomy().classes
    expected = Counter()
    for spec in plan.sites:
        for cls, n in plan.info["boxes"][spec.name]["train"].items():
            expected[str(classes.index(cls))] += n
    assert boxes == +expected


def test_rebuilding_into_the_same_folder_gives_the_same_sites(
    built: tuple[SitePlan, Path], shared_dir: Path
) -> None:
    plan, out = built
    before = {s.name: _tree(_site_root(s.data_yaml)) for s in plan.sites}
    again = build_site_datasets(shared_dir / "datasets", out, manaus_sites=3, min_frames=10)
    assert again == plan
    assert {s.name: _tree(_site_root(s.data_yaml)) for s in again.sites} == before
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", ".old-"))]


# --------------------------------------------------------------------------- a fake source


def _frame(root: Path, split: str, stem: str, grey: int, rows: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    img = np.clip(grey + rng.integers(-10, 11, (48, 64, 3)), 0, 255).astype(np.uint8)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    path = root / "images" / split / f"{stem}.jpg"
    path.write_bytes(encode_jpeg(img))
    (root / "labels" / split / f"{stem}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _fake_sources(base: Path) -> Path:
    """atl_v2: 12+2 bright and 12+2 dark frames, 2 test; manaus_v4: a 'frame' video and
    three small cameras; one bad label file and one train frame copying a test frame."""
    atl, man = base / "atl_v2", base / "manaus_v4"
    box = "2 0.5 0.5 0.2 0.2"  # car in both sources' ids
    seed = 0
    for split, n in (("train", 12), ("val", 2), ("test", 1)):
        for i in range(n):
            seed += 1
            _frame(atl, split, f"{i}_png", 170, [box], seed)
            seed += 1
            _frame(atl, split, f"{100 + i}_png", 25, [box], seed)
    # row 2: class id 7 is not in atl_v2's names; row 3: four fields
    bad = [box, "7 0.5 0.5 0.1 0.1", "1 0.5 0.5", "0 0.2 0.2 0.1 0.1"]
    _frame(atl, "train", "50_png", 170, bad, 999)
    test_copy = (atl / "images" / "test" / "0_png.jpg").read_bytes()
    (atl / "images" / "train" / "77_png.jpg").write_bytes(test_copy)
    (atl / "labels" / "train" / "77_png.txt").write_text(box + "\n", encoding="utf-8")
    for split, n in (("train", 14), ("val", 3), ("test", 2)):
        for i in range(n):
            seed += 1
            _frame(man, split, f"frame{i}_jpg", 120, ["1 0.5 0.5 0.2 0.2"], seed)
        for cam in ("abcdef", "ghijkl", "mnopqr"):
            for i in range(n // 2 + 1):
                seed += 1
                _frame(man, split, f"{cam}{i}_jpg", 120, ["3 0.4 0.4 0.1 0.3"], seed)
    names = {"atl_v2": ["bike", "bus", "car", "truck"],
             "manaus_v4": ["biker", "car", "cyclist", "people", "truck"]}
    for root in (atl, man):
        doc = {"train": "images/train", "val": "images/val", "test": "images/test",
               "names": dict(enumerate(names[root.name]))}
        (root / "data.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    return base


def test_bad_label_rows_are_reported_not_fatal(tmp_path: Path) -> None:
    src = _fake_sources(tmp_path / "datasets")
    plan = build_site_datasets(src, tmp_path / "sites", manaus_sites=2, min_frames=5)
    assert {s.name for s in plan.sites} == {"atl_day", "atl_night", "manaus_frame", "manaus_mix1"}
    day = plan.site("atl_day")
    # The bad-label frame goes whole (its rejected objects would be learnt as background),
    # and the copy of a test frame is gone: 12 left.
    assert day.frames == 12
    assert day.quality == pytest.approx(14 / 15, abs=1e-3)  # train + val frames, 1 with bad rows
    assert plan.site("atl_night").quality == 1.0
    reasons = plan.info["quarantine"]["atl_day"]
    assert reasons == {"duplicate across splits": 1, "frame with rejected label rows": 1,
                       "malformed row": 1, "unknown class id": 1}
    site_root = _site_root(day.data_yaml)
    assert not (site_root / "labels" / "train" / "atl_v2__50_png.txt").exists()
    assert not list((site_root / "images" / "train").glob("atl_v2__50_png.*"))
    records = [
        json.loads(r) for r in (tmp_path / "sites" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert {(r["line"], r["reason"]) for r in records if r["file"].endswith("50_png.txt")} == {
        (2, "unknown class id"),
        (3, "malformed row"),
    }
    assert [r["reason"] for r in records if r["file"].endswith("50_png.jpg")] == [
        "frame with rejected label rows"
    ]
    assert plan.info["counts"]["test"]["test"] == 2 + 2 + 3 * 2  # atl, frame, three cameras


def test_sites_below_min_frames_are_left_out_and_named(tmp_path: Path) -> None:
    src = _fake_sources(tmp_path / "datasets")
    plan = build_site_datasets(src, tmp_path / "sites", manaus_sites=2, min_frames=13)
    # atl_day and atl_night have 12 train frames each (atl_day's bad-label frame goes whole).
    assert {s.name for s in plan.sites} == {"manaus_frame", "manaus_mix1"}
    assert set(plan.info["dropped_sites"]) == {"atl_day", "atl_night"}
    with pytest.raises(EmptyDatasetError):
        build_site_datasets(src, tmp_path / "none", manaus_sites=2, min_frames=1000)


def test_sites_in_reads_a_built_layout_back(shared_dir, tmp_path):
    from roadloop.federation.sites import build_site_datasets, sites_in

    plan = build_site_datasets(shared_dir / "datasets", tmp_path / "sites")
    found = sites_in(tmp_path / "sites")
    assert [(s.name, s.frames, s.quality) for s in found] == sorted(
        (s.name, s.frames, s.quality) for s in plan.sites
    )
