"""COCO image and category ids for predicted image files, so that predictions can be scored
against a COCO instances file.

The instances file is the one given, or else the one beside the images in the COCO layout: an
image under ROOT/<split>/ belongs to ROOT/annotations/instances_<split>.json. Images are matched
by `file_name`, which COCO stores relative to the split folder; with a given file, the longest
`file_name` that ends the image's path wins."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ...errors import DataError
from .coco import CocoAnnotations


def beside_annotations(folder: Path) -> tuple[Path, Path] | None:
    """(ROOT/annotations/instances_<split>.json, ROOT/<split>) for the nearest ROOT/<split> at or
    above `folder` that has such a file; None if there is none."""
    for split_dir in (folder, *folder.parents):
        if split_dir.parent == split_dir:
            break
        candidate = split_dir.parent / "annotations" / f"instances_{split_dir.name}.json"
        if candidate.is_file():
            return candidate, split_dir
    return None


def category_ids_in(anns: CocoAnnotations, class_names: list[str]) -> list[int]:
    """The category id in `anns` of each of the run's labels (matched by class name)."""
    by_name = {name: cat for cat, name in zip(anns.cat_ids, anns.class_names)}
    if sorted(by_name) != sorted(class_names) or len(by_name) != len(anns.cat_ids):
        raise DataError(f"{anns.file}: categories {anns.class_names} differ from the run's {list(class_names)}; "
                        "its image and category ids do not apply to this model's predictions")
    return [by_name[name] for name in class_names]


class CocoImageIds:
    """Looks up each image file's COCO image id (reading each instances file once) and keeps count
    of which images got one, which had an instances file without an entry for them, and which had none.

    A given instances file must load and have the run's categories (DataError otherwise); one found
    beside the images that does not is set aside with a note, and its images get no ids."""

    def __init__(self, class_names: list[str], annotations: str | Path | None = None):
        self.class_names = list(class_names)
        self._loaded: dict[Path, tuple[dict[str, int], list[int]] | None] = {}
        self._beside: dict[Path, tuple[Path, Path] | None] = {}
        self.given = Path(annotations) if annotations is not None else None
        if self.given is not None:
            self._load(self.given, strict=True)  # a bad file is an error before any image is read
        self.matched: dict[Path, int] = {}  # instances file -> images given its ids
        self.not_in_file: dict[Path, list[str]] = {}  # instances file -> images it does not list
        self.set_aside: dict[Path, str] = {}  # found instances file -> why it is not used
        self.no_file: list[str] = []  # images with no (usable) instances file

    def _load(self, path: Path, strict: bool) -> tuple[dict[str, int], list[int]] | None:
        """(image id by normalised file_name, category id of each label) of an instances file;
        None (and a note) for an unusable file found beside the images."""
        if path not in self._loaded:
            try:
                anns = CocoAnnotations(path)
                cat_ids = category_ids_in(anns, self.class_names)
            except DataError as e:
                if strict:
                    raise
                self.set_aside[path] = str(e)
                self._loaded[path] = None
            else:
                by_name = {PurePosixPath(anns.images[i]["file_name"].replace("\\", "/")).as_posix(): i
                           for i in anns.image_ids}
                self._loaded[path] = by_name, cat_ids
        return self._loaded[path]

    def _find(self, image: Path) -> tuple[Path, str] | None:
        """(instances file, the image's name as that file would list it), or None."""
        if self.given is not None:
            parts = image.parts
            by_name, _ = self._load(self.given, strict=True)
            names = ("/".join(parts[-k:]) for k in range(len(parts), 0, -1))
            return self.given, next((n for n in names if n in by_name), "")
        if image.parent not in self._beside:
            self._beside[image.parent] = beside_annotations(image.parent)
        found = self._beside[image.parent]
        if found is None:
            return None
        path, split_dir = found
        return path, image.relative_to(split_dir).as_posix()

    def lookup(self, image: str | Path) -> tuple[int | None, list[int] | None]:
        """(COCO image id or None, category id of each label or None) of one image file; None
        category ids mean no instances file applies (the caller's own ids are used)."""
        image = Path(os.path.abspath(image))  # absolute but not resolved: the folder layout counts
        found = self._find(image)
        loaded = self._load(found[0], strict=False) if found is not None else None
        if loaded is None:
            self.no_file.append(str(image))
            return None, None
        (path, name), (by_name, cat_ids) = found, loaded
        if name not in by_name:
            self.not_in_file.setdefault(path, []).append(str(image))
            return None, cat_ids
        self.matched[path] = self.matched.get(path, 0) + 1
        return by_name[name], cat_ids

    def notes(self) -> list[str]:
        """What a user should know about the image ids written: where they came from, and which
        images have none (their results carry `file_name` only)."""
        lines = [f"image_id: COCO image ids from {path} ({n} images)" for path, n in self.matched.items()]
        for path, images in self.not_in_file.items():
            lines.append(f"warning: {len(images)} images are not in {path} (e.g. {images[0]}); "
                         "their results carry file_name only, no image_id")
        for path, why in self.set_aside.items():
            lines.append(f"warning: not using the image ids of {path}: {why}")
        if self.no_file:
            lines.append(f"warning: no usable COCO annotation file for {len(self.no_file)} images (none given "
                         "with --annotations, none found as ROOT/annotations/instances_<split>.json beside "
                         "ROOT/<split>/); their results carry file_name only, no image_id")
        return lines
