"""The scan before training: usable images per concept, skipped files with reasons, buckets.

It runs before any model is loaded, so a missing folder or a dataset without one usable image is
a UserError in the first second. Every image is hashed and decoded here (threads; JPEGs at reduced
scale) so broken files are reported, not discovered mid-run; a scan index in the cache folder
remembers files by (size, mtime) so an unchanged dataset is scanned again in a blink.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.config.data_schema import ConceptConfig, DataConfig
from modules.data.buckets import Size, make_buckets, nearest_bucket
from modules.data.captions import CaptionError, read_caption
from modules.data.images import (
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    UNSUPPORTED_SUFFIXES,
    ImageError,
    ImageInfo,
    background_rgb,
    mask_path,
    probe,
)
from modules.errors import UserError
from modules.training.data_order import Group
from modules.util.atomic import atomic_write_text
from modules.util.text import printable

log = logging.getLogger(__name__)

INDEX_VERSION = 1


@dataclass(frozen=True)
class ImageRecord:
    """A usable image as the scan found it."""

    path: Path
    concept: int
    caption: str  # from the caption source, before trigger word and augmentation
    size: Size  # (width, height) after EXIF rotation
    sha256: str
    has_alpha: bool
    mask: Path | None


@dataclass(frozen=True)
class Sample:
    """An image at one training resolution, in its bucket."""

    record: ImageRecord
    resolution: int
    bucket: Size


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class ConceptReport:
    key: str  # e.g. data.concepts.0
    folder: Path
    images: int = 0
    per_epoch: int = 0
    masks: int = 0
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class Dataset:
    """Scanned samples, their bucket groups for DataOrder, and what the report shows."""

    concepts: list[ConceptConfig]
    samples: list[Sample]
    groups: list[Group]
    reports: list[ConceptReport]
    buckets: dict[int, Counter[Size]]  # resolution -> bucket -> images
    masked: bool

    @property
    def skipped(self) -> list[Skipped]:
        return [s for report in self.reports for s in report.skipped]

    def fingerprint(self) -> dict[str, Any]:
        """The trained images by content and concept: a backup stores it, so a resume on a
        changed dataset can say so."""
        unique = {s.record for s in self.samples}  # a sample per training resolution
        records = sorted((record.concept, record.sha256) for record in unique)
        digest = hashlib.sha256("".join(f"{c}:{h}\n" for c, h in records).encode())
        return {"images": len(records), "sha256": digest.hexdigest()}

    def report_lines(self, title: str = "data") -> list[str]:
        images = sum(r.images for r in self.reports)
        skipped = len(self.skipped)
        concepts = f"{len(self.reports)} concept{'s' if len(self.reports) != 1 else ''}"
        lines = [f"{title}: {images} images in {concepts}, {skipped} files skipped"]
        for report in self.reports:
            masks = f", {report.masks} with masks" if self.masked else ""
            lines.append(
                f"  {report.key} {report.folder}: {report.images} images, "
                f"{report.per_epoch} per epoch{masks}"
            )
        lines += [f"  skipped {s.path}: {s.reason}" for s in self.skipped]
        for resolution, counts in self.buckets.items():
            shown = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(counts.items()))
            lines.append(f"  buckets at {resolution} px: {shown}")
        return [printable(line) for line in lines]


class ScanIndex:
    """Probe results remembered by (path, size, mtime), stored as JSON in the cache folder."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                if raw.get("version") == INDEX_VERSION:
                    self.entries = raw["files"]
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("scan index %s is unreadable; rescanning", path)

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def lookup(self, path: Path) -> ImageInfo | str | None:
        """The remembered probe (info, or a skip reason), None when unknown or changed."""
        entry = self.entries.get(str(path))
        if entry is None or entry["stamp"] != self._stamp(path):
            return None
        if "reason" in entry:
            return entry["reason"]
        return ImageInfo(entry["sha256"], tuple(entry["size"]), entry["alpha"])

    def store(self, path: Path, result: ImageInfo | str) -> None:
        entry: dict[str, Any] = {"stamp": self._stamp(path)}
        if isinstance(result, str):
            entry["reason"] = result
        else:
            entry.update(sha256=result.sha256, size=list(result.size), alpha=result.has_alpha)
        self.entries[str(path)] = entry
        self.changed = True

    def save(self) -> None:
        if self.path is not None and self.changed:
            text = json.dumps({"version": INDEX_VERSION, "files": self.entries})
            atomic_write_text(self.path, text)
            self.changed = False


def _hidden(path: Path, folder: Path) -> bool:
    """Dot files and anything in dot folders (.DS_Store, ._img.jpg, .thumbnails/)."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _not_a_file(path: Path) -> str | None:
    """Why an entry with an image's name is no image file (None when it is a regular file)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "broken link (its target is missing)" if path.is_symlink() else "gone"
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return "not a regular file (a FIFO, socket or device)"


def _list_files(folder: Path, *, recursive: bool) -> tuple[list[Path], list[Skipped]]:
    """Candidate images (masks excluded), and the image-named entries that cannot be images
    (unsupported formats, broken links, FIFOs), sorted."""
    walk = folder.rglob("*") if recursive else folder.iterdir()
    entries = sorted(p for p in walk if not _hidden(p, folder))
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    stems = {p.with_suffix("") for p in images}

    def is_mask(path: Path) -> bool:  # the scan reports a mask with its image
        stem = path.stem.removesuffix(MASK_SUFFIX)
        return stem != path.stem and path.parent / stem in stems

    masks = {p for p in images if is_mask(p)}
    imagelike = IMAGE_SUFFIXES + tuple(UNSUPPORTED_SUFFIXES)
    odd = [(p, _not_a_file(p)) for p in entries if p.suffix.lower() in imagelike]
    broken = [Skipped(p, reason) for p, reason in odd if reason is not None and not is_mask(p)]
    skipped = [
        Skipped(p, f"unsupported format ({p.suffix.lower()}); convert it to png or jpg")
        for p in files
        if p.suffix.lower() in UNSUPPORTED_SUFFIXES
    ]
    return [p for p in images if p not in masks], broken + skipped


def _probe_all(paths: list[Path], *, index: ScanIndex, background: tuple[int, int, int]):
    results: dict[Path, ImageInfo | str] = {}
    todo = []
    for path in paths:
        known = index.lookup(path)
        if known is None:
            todo.append(path)
        else:
            results[path] = known

    def run(path: Path) -> ImageInfo | str:
        try:
            return probe(path, background=background)
        except ImageError as error:
            return str(error)

    threads = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for path, result in zip(todo, pool.map(run, todo), strict=True):
            results[path] = result
            if path.exists():
                index.store(path, result)
    return results


def _share(total: int, sizes: list[int]) -> list[int]:
    """Split `total` draws over groups of `sizes` images in proportion (largest remainder)."""
    count = sum(sizes)
    exact = [total * size / count for size in sizes]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (shares[i] - exact[i], i))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares


def scan_concepts(
    concepts: list[ConceptConfig],
    config: DataConfig,
    *,
    key: str,
    step: int,
    index: ScanIndex,
) -> Dataset:
    """Scan `concepts` (named `key` in messages); UserError when a folder or image is missing."""
    if not concepts:
        raise UserError(f'{key} is empty: add at least one {{"path": "<image folder>"}}')
    background = background_rgb(config.alpha_background)
    resolutions = list(dict.fromkeys([config.resolution, *config.extra_resolutions]))
    buckets_of = {
        r: make_buckets(r, step=step, max_aspect=config.bucket_max_aspect, enabled=config.bucketing)
        for r in resolutions
    }
    records: list[ImageRecord] = []
    reports: list[ConceptReport] = []
    for number, concept in enumerate(concepts):
        folder = Path(concept.path).expanduser()
        if not folder.is_dir():
            raise UserError(f"{key}.{number}.path: folder {str(folder)!r} does not exist")
        report = ConceptReport(key=f"{key}.{number}", folder=folder)
        paths, report.skipped = _list_files(folder, recursive=concept.recursive)
        probed = _probe_all(paths, index=index, background=background)
        for path in paths:
            result = probed[path]
            if isinstance(result, str):
                report.skipped.append(Skipped(path, result))
                continue
            if min(result.size) < config.min_image_side:
                width, height = result.size
                reason = f"too small ({width}x{height} px; data.min_image_side is "
                report.skipped.append(Skipped(path, f"{reason}{config.min_image_side})"))
                continue
            try:
                caption = read_caption(path, concept)
            except CaptionError as error:
                report.skipped.append(Skipped(path, str(error)))
                continue
            mask = mask_path(path)
            if config.masked_training and mask.is_symlink() and not mask.exists():
                reason = f"its mask {mask.name} is a broken link (its target is missing)"
                report.skipped.append(Skipped(path, reason))
                continue
            mask = mask if config.masked_training and mask.is_file() else None
            report.masks += mask is not None
            records.append(
                ImageRecord(
                    path=path,
                    concept=number,
                    caption=caption,
                    size=result.size,
                    sha256=result.sha256,
                    has_alpha=result.has_alpha,
                    mask=mask,
                )
            )
            report.images += 1
        report.skipped.sort(key=lambda s: str(s.path))
        reports.append(report)
        if not report.images:
            index.save()
            what = "no usable image" if paths or report.skipped else "no images"
            reasons = "; ".join(f"{s.path.name}: {s.reason}" for s in report.skipped[:3])
            more = f" ({len(report.skipped)} skipped: {reasons})" if report.skipped else ""
            suffixes = ", ".join(IMAGE_SUFFIXES)
            raise UserError(f"{key}.{number}.path: {what} ({suffixes}) in {str(folder)!r}{more}")
    index.save()
    return _bucketed(concepts, records, reports, buckets_of, masked=config.masked_training)


def _bucketed(
    concepts: list[ConceptConfig],
    records: list[ImageRecord],
    reports: list[ConceptReport],
    buckets_of: dict[int, list[Size]],
    *,
    masked: bool,
) -> Dataset:
    samples: list[Sample] = []
    groups: list[Group] = []
    counts: dict[int, Counter[Size]] = {r: Counter() for r in buckets_of}
    for resolution, buckets in buckets_of.items():
        for number, concept in enumerate(concepts):
            members: dict[Size, list[int]] = {}
            for record in records:
                if record.concept == number:
                    bucket = nearest_bucket(record.size, buckets)
                    members.setdefault(bucket, []).append(len(samples))
                    samples.append(Sample(record, resolution, bucket))
                    counts[resolution][bucket] += 1
            order = sorted(members)
            sizes = [len(members[b]) for b in order]
            total = max(1, round(concept.repeats * sum(sizes)))
            for bucket, share in zip(order, _share(total, sizes), strict=True):
                if share:
                    groups.append(Group(bucket, tuple(members[bucket]), share))
            reports[number].per_epoch += total
    return Dataset(concepts, samples, groups, reports, counts, masked)
