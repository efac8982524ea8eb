"""The simulated annotator answers edge frames read from a labelled dataset's image folder."""

from pathlib import Path

from roadloop.labeling.oracle import ground_truth_for_image


def _dataset(root: Path, name: str = "atl_v2") -> Path:
    (root / name / "images" / "train").mkdir(parents=True)
    (root / name / "labels" / "train").mkdir(parents=True)
    (root / name / "data.yaml").write_text("names: [car]\n")
    image = root / name / "images" / "train" / "a.jpg"
    image.write_bytes(b"jpeg")
    (root / name / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    return image


def test_image_in_a_labelled_source_resolves_through_symlinks(tmp_path: Path) -> None:
    image = _dataset(tmp_path / "shared")
    stream = tmp_path / "stream"
    stream.mkdir()
    (stream / "0001.jpg").symlink_to(image)
    found = ground_truth_for_image(f"image:{stream / '0001.jpg'}", {"atl_v2"})
    assert found == (str(tmp_path / "shared/atl_v2/labels/train/a.txt"), "atl_v2")


def test_frames_without_ground_truth_are_not_answered(tmp_path: Path) -> None:
    image = _dataset(tmp_path / "shared")
    assert ground_truth_for_image(f"image:{image}", {"manaus_v4"}) is None  # not a taxonomy source
    assert ground_truth_for_image("video:cctv_street.mp4#12", {"atl_v2"}) is None
    assert ground_truth_for_image(None, {"atl_v2"}) is None
    assert ground_truth_for_image(f"image:{tmp_path / 'missing.jpg'}", {"atl_v2"}) is None
    (tmp_path / "shared/atl_v2/labels/train/a.txt").unlink()
    assert ground_truth_for_image(f"image:{image}", {"atl_v2"}) is None
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(b"x")
    assert ground_truth_for_image(f"image:{loose}", {"atl_v2"}) is None
