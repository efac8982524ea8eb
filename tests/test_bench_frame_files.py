"""``benchmarks.frame_files`` writes what each of its two ways says, and reports both."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import frame_files


def _jpegs() -> list[bytes]:
    return [b"\xff\xd8\xff" + bytes([i]) * (100 + i) + b"\xff\xd9" for i in range(3)]


def test_each_way_writes_its_files_and_the_report_has_both(tmp_path: Path) -> None:
    jpegs = _jpegs()
    doc = frame_files.measure(tmp_path / "run", jpegs, rounds=2, requests=3)
    requests = (2 + 1) * 3  # a warm-up round, then two, of three requests a way
    per_frame = sorted((tmp_path / "run" / "files").iterdir())
    segments = sorted((tmp_path / "run" / "segment").iterdir())
    assert len(per_frame) == requests * frame_files.FRAMES_PER_REQUEST * 2
    assert {p.suffix for p in per_frame} == {".jpg", ".json"}
    assert len(segments) == requests and all(p.suffix == ".seg" for p in segments)

    # A frame file holds its JPEG; a segment holds its request's images and records in order.
    first = min(p for p in per_frame if p.suffix == ".jpg")
    assert first.read_bytes() == jpegs[0]
    record_len = frame_files.RECORD_BYTES
    assert (tmp_path / "run" / "files" / f"{first.stem}.json").stat().st_size == record_len
    seg = segments[0].read_bytes()
    sizes = sum(len(jpegs[i % len(jpegs)]) + record_len
                for i in range(frame_files.FRAMES_PER_REQUEST))
    assert len(seg) == sizes and seg.startswith(jpegs[0])

    assert set(doc["ways"]) == {"files", "segment"}
    for way in doc["ways"].values():
        assert len(way["process"]["rounds"]) == 2 and len(way["node"]["rounds"]) == 2
    assert doc["saved"]["process"]["of"] == 2

    md = frame_files.to_markdown({
        **doc, "at": "2026-11-29T00:00:00+00:00", "machine": "test", "jpegs": "3 test JPEGs",
        "file_system": "tmpfs on /tmp", "rounds": 2, "requests_per_round": 3,
        "quiet": {"waited_s": 0.0, "file_create_ms": 0.01},
        "load_average_start_end": [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
    })
    assert "| two files a frame" in md and "| one segment file a request" in md
    assert "saves **" in md


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--requests", "-3"],
                                  ["--max-create-ms", "0"], ["--max-create-ms", "-1"],
                                  ["--max-create-ms", "nan"]])
def test_absurd_arguments_are_refused_before_anything_runs(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        frame_files.main(["--out", str(tmp_path / "out"), "--where", str(tmp_path), *args])
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no work folder, no report
