"""DVC dataset versions: add + push, restore from the remote with an empty cache."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from roadloop.data.datasets import build_curated_dataset, load_taxonomy, make_synthetic_dataset
from roadloop.data.versioning import DvcError, DvcStore
from roadloop.errors import InvalidInputError, MissingDataError


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def curated(tmp_path: Path, out: Path, seed: int) -> Path:
    spec = make_synthetic_dataset(
        tmp_path / f"syn{seed}", n_train=4, n_val=2, n_test=1, imgsz=64, seed=seed
    )
    build_curated_dataset([spec], out, load_taxonomy(), 0.0, progress=False)
    return out


@pytest.fixture()
def store(tmp_path: Path) -> DvcStore:
    s = DvcStore(tmp_path / "repo", str(tmp_path / "remote"))
    s.ensure()
    return s


def test_ensure_is_idempotent_and_follows_remote_url(store: DvcStore, tmp_path: Path):
    store.ensure()
    config = (store.repo_dir / ".dvc" / "config").read_text()
    assert "no_scm = True" in config and "analytics = false" in config
    assert config.count('remote "storage"') == 1 and str(tmp_path / "remote") in config
    moved = DvcStore(store.repo_dir, str(tmp_path / "remote2"))
    moved.ensure()
    assert str(tmp_path / "remote2") in (store.repo_dir / ".dvc" / "config").read_text()


def test_two_versions_restore_from_remote_with_empty_cache(store: DvcStore, tmp_path: Path):
    data = store.repo_dir / "data" / "curated"
    curated(tmp_path, data, seed=1)
    v1_tree = tree(data)
    v1 = store.add_and_push(data)
    assert v1.nfiles == len(v1_tree) and v1.size == sum(
        p.stat().st_size for p in data.rglob("*") if p.is_file()
    )
    assert v1.dvc_file == store.repo_dir / "versions" / f"{v1.md5}.dvc"

    curated(tmp_path, data, seed=2)
    (data / "labels" / "train.cache").write_bytes(b"ultralytics cache, ignored")
    v2_tree = {k: v for k, v in tree(data).items() if not k.endswith(".cache")}
    v2 = store.add_and_push(data)
    assert v2.md5 != v1.md5 and v2.nfiles == len(v2_tree)
    assert {v.md5 for v in store.versions()} == {v1.md5, v2.md5}

    shutil.rmtree(store.repo_dir / ".dvc" / "cache")
    shutil.rmtree(data)
    r1 = store.restore(v1.md5, tmp_path / "restored" / "v1")
    assert tree(r1) == v1_tree
    r2 = store.restore(v2.md5 + ".dir", tmp_path / "restored" / "v2")
    assert tree(r2) == v2_tree
    assert not [p for p in store.repo_dir.iterdir() if p.name.startswith(".restore-")]

    with pytest.raises(InvalidInputError, match="already exists"):
        store.restore(v1.md5, r2)
    store.restore(v1.md5, r2, overwrite=True)
    assert tree(r2) == v1_tree


def test_unknown_version_is_a_clear_error(store: DvcStore, tmp_path: Path):
    with pytest.raises(MissingDataError, match="unknown dataset version 0123abcd"):
        store.restore("0123abcd", tmp_path / "x")
    with pytest.raises(InvalidInputError, match="md5"):
        store.restore("not-a-hash", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fresh_repo_restores_any_pushed_version_from_the_remote(store, tmp_path: Path):
    data = curated(tmp_path, store.repo_dir / "data" / "curated", seed=4)
    expected = tree(data)
    v = store.add_and_push(data)
    other = DvcStore(tmp_path / "other-machine", str(tmp_path / "remote"))
    assert tree(other.restore(v.md5, tmp_path / "restored")) == expected


def test_data_outside_repo_is_rejected(store: DvcStore, tmp_path: Path):
    with pytest.raises(InvalidInputError, match="inside the DVC repo"):
        store.add_and_push(tmp_path / "elsewhere")


def test_lost_remote_data_fails_with_dvc_message_and_no_target(store: DvcStore, tmp_path: Path):
    data = curated(tmp_path, store.repo_dir / "data" / "curated", seed=3)
    v = store.add_and_push(data)
    shutil.rmtree(store.repo_dir / ".dvc" / "cache")
    shutil.rmtree(tmp_path / "remote")
    (tmp_path / "remote").mkdir()
    target = tmp_path / "restored"
    with pytest.raises(DvcError, match="dvc pull.*Missing cache files"):
        store.restore(v.md5, target)
    assert not target.exists()
    assert not [p for p in store.repo_dir.iterdir() if p.name.startswith(".restore-")]
