"""What an evaluation is given, checked and read: model files and YOLO data YAMLs.

* **Model files** - ``.pt`` or ``.onnx``, non-empty; an ONNX export has a static spatial
  size, which must be the asked ``imgsz`` (:func:`check_model_file`, :func:`check_onnx_imgsz`).
* **Data YAMLs** - class names in id order (:func:`read_class_names`), a split's image files
  resolved like Ultralytics does (:func:`split_images`) and each frame's YOLO label file
  (:func:`label_path_for`).

Every failure is a :mod:`roadloop.errors` error naming the offending path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from roadloop.errors import EmptyDatasetError, InvalidInputError, MissingDataError

_IMG_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm"}


def require_file(path: Path, what: str) -> Path:
    """``path`` as a Path; :class:`MissingDataError` naming ``what`` when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{what} not found: {path}", path)
    return path


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInputError(path, f"cannot read YAML ({exc})") from exc
    if not isinstance(doc, dict):
        raise InvalidInputError(path, "data YAML is not a mapping")
    return doc


def _names_from_doc(doc: dict[str, Any], path: Path) -> list[str]:
    names = doc.get("names")
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(path, f"'names' keys must be class ids ({exc})") from exc
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    raise InvalidInputError(path, "data YAML has no 'names' (class list)")


def read_class_names(data_yaml: Path) -> list[str]:
    """Class names of a YOLO data YAML, in id order."""
    data_yaml = require_file(Path(data_yaml), "data YAML")
    return _names_from_doc(_read_yaml(data_yaml), data_yaml)


def is_image(p: Path) -> bool:
    """Whether ``p`` has an image suffix Ultralytics reads."""
    return p.suffix.lower() in _IMG_SUFFIXES


def split_images(data_yaml: Path, split: str) -> list[Path]:
    """Image files of one split of a data YAML, resolved like Ultralytics does
    (``path:`` or the YAML's folder; a split is a folder, a ``.txt`` list, or a list)."""
    data_yaml = require_file(Path(data_yaml), "data YAML")
    doc = _read_yaml(data_yaml)
    entry = doc.get(split)
    if not entry:
        raise InvalidInputError(data_yaml, f"no '{split}:' split in data YAML")
    root = Path(doc.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root) if not root.exists() else root
    images: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(item)
        p = p if p.is_absolute() else (root / p)
        if p.is_dir():
            images += [q for q in p.rglob("*") if q.is_file() and is_image(q)]
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if not line:
                    continue
                q = Path(
                    line.replace("./", str(p.parent) + os.sep, 1) if line.startswith("./") else line
                )
                if is_image(q):
                    images.append(q)
        elif p.is_file() and is_image(p):
            images.append(p)
        else:
            raise MissingDataError(f"split '{split}' of {data_yaml} points at missing {p}", p)
    if not images:
        raise EmptyDatasetError(f"split '{split}' of {data_yaml} has no images")
    return sorted(images, key=str)


def label_path_for(image: Path) -> Path:
    """YOLO convention (as Ultralytics' ``img2label_paths``): last ``/images/`` → ``/labels/``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in s:
        s = sb.join(s.rsplit(sa, 1))
    return Path(s).with_suffix(".txt")


def _onnx_input(model_path: Path) -> tuple[str, list[int | str]]:
    """The first graph input's name and shape, read from the file's graph.

    Reading the protobuf costs a few milliseconds; an ONNX Runtime session (optimised graph,
    kernels) costs 50-500 ms, and the benchmark asks this of every file before any work.
    """
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # DecodeError for bytes that are no ModelProto, OSError
        raise InvalidInputError(model_path, f"not a readable ONNX model ({exc})") from exc
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if not inputs:
        raise InvalidInputError(model_path, "not an ONNX model: its graph has no input")
    tensor = inputs[0].type.tensor_type
    shape: list[int | str] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim
    ]
    return inputs[0].name, shape


def check_onnx_imgsz(model_path: Path, imgsz: int) -> None:
    """ONNX exports have a static spatial size; evaluating at another one fails deep in
    ONNX Runtime, so say it plainly here."""
    if Path(model_path).suffix.lower() != ".onnx":
        return
    _, shape = _onnx_input(model_path)
    hw = [d for d in shape[2:4] if isinstance(d, int)]
    if any(d != imgsz for d in hw):
        raise InvalidInputError(
            model_path, f"ONNX input is {shape} (static spatial size), but imgsz={imgsz} was asked"
        )


def check_model_file(model_path: Path, what: str = "model file") -> Path:
    """``model_path`` when it is a non-empty ``.pt`` or ``.onnx`` file, else a named error."""
    model_path = require_file(Path(model_path), what)
    if model_path.suffix.lower() not in (".pt", ".onnx"):
        raise InvalidInputError(model_path, "unsupported model format (expected .pt or .onnx)")
    if model_path.stat().st_size == 0:
        raise InvalidInputError(model_path, "model file is empty")
    return model_path
