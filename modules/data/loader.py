"""Turning a micro-batch's draws into a Batch: from the cache when it can, from the files when not.

`BatchLoader` is plain picklable data, so torch DataLoader workers can run it in the background;
each micro-batch is still a pure function of its position, whichever worker loads it. A file that
went bad after the scan (deleted, replaced, truncated) is skipped with a warning and another image
of the same bucket takes its place, so the batch keeps its size and the step goes on.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modules.config.data_schema import ConceptConfig, DataConfig
from modules.data.buckets import Placement, place
from modules.data.cache import entry_key, entry_path, read_entry
from modules.data.captions import augment, varies_per_use, with_trigger
from modules.data.images import ImageError, background_rgb, load_mask, load_pixels
from modules.data.scan import Sample
from modules.models.base import Batch
from modules.training.data_order import DataOrder, Draw

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachePlan:
    """What the loader may read from the cache; None fields mean encode live."""

    root: Path
    latent_id: str | None = None  # VAE fingerprint when latents are cached
    text_id: str | None = None  # text-encoder fingerprint when text embeddings are cached


def latent_key(sample: Sample, placement: Placement, *, latent_id: str, background: str) -> str:
    record = sample.record
    return entry_key(
        {
            "kind": "latent",
            "image": record.sha256,
            "encoder": latent_id,
            "resolution": sample.resolution,
            "bucket": placement.bucket,
            "resized": placement.resized,
            "crop": [placement.top, placement.left],
            "flip": placement.flip,
            "background": background if record.has_alpha else None,
        }
    )


def text_key(caption: str, *, text_id: str) -> str:
    return entry_key({"kind": "text", "caption": caption, "encoder": text_id})


@dataclass
class View:
    """One sample as a micro-batch uses it: where it is cropped and what its caption is."""

    sample: Sample
    placement: Placement
    caption: str


@dataclass
class BatchLoader:
    """Loads micro-batches of `samples`; `augment` off gives center crops and plain captions."""

    samples: list[Sample]
    config: DataConfig
    concepts: list[ConceptConfig]
    cache: CachePlan | None
    augment: bool
    _bad: set[int] = field(default_factory=set)
    _by_bucket: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for index, sample in enumerate(self.samples):
            self._by_bucket.setdefault(sample.bucket, []).append(index)

    @property
    def caches_latents(self) -> bool:
        random_crop = self.augment and self.config.crop == "random"
        return self.cache is not None and self.cache.latent_id is not None and not random_crop

    def caches_text(self, concept: int) -> bool:
        varies = self.augment and varies_per_use(self.concepts[concept])
        return self.cache is not None and self.cache.text_id is not None and not varies

    def view(self, index: int, seed: tuple[int, ...]) -> View:
        """Crop, flip and caption of sample `index`, drawn from `seed` (fixed when not augmenting)."""
        sample = self.samples[index]
        concept = self.concepts[sample.record.concept]
        rng = np.random.default_rng(seed)
        flip_draw, crop_draws = rng.random(), (rng.random(), rng.random())
        placement = place(
            sample.record.size,
            sample.bucket,
            random_crop=self.augment and self.config.crop == "random",
            flip=self.augment and self.config.flip and flip_draw < 0.5,
            draws=crop_draws,
        )
        caption = sample.record.caption
        caption = augment(caption, concept, rng) if self.augment else with_trigger(caption, concept)
        return View(sample, placement, caption)

    def _replacements(self, index: int) -> Iterator[int]:
        """`index`, then the other samples of its bucket in a fixed order, skipping known-bad ones."""
        members = self._by_bucket[self.samples[index].bucket]
        start = members.index(index)
        for candidate in itertools.chain(members[start:], members[:start]):
            if candidate not in self._bad:
                yield candidate

    def _pixels(self, draw: Draw) -> tuple[View, torch.Tensor] | None:
        background = background_rgb(self.config.alpha_background)
        for index in self._replacements(draw.index):
            view = self.view(index, draw.seed)
            try:
                return view, load_pixels(
                    view.sample.record.path, view.placement, background=background
                )
            except ImageError as error:
                self._bad.add(index)
                log.warning("skipped %s: %s", view.sample.record.path, error)
        return None

    def _cached_latents(self, views: list[View]) -> list[dict[str, torch.Tensor]] | None:
        if not self.caches_latents:
            return None
        found = []
        for view in views:
            key = latent_key(
                view.sample,
                view.placement,
                latent_id=self.cache.latent_id,
                background=self.config.alpha_background,
            )
            entry = read_entry(entry_path(self.cache.root, "latents", key), key=key)
            if entry is None:
                return None
            found.append(entry)
        return found

    def _cached_text(self, views: list[View]) -> dict[str, torch.Tensor] | None:
        if not all(self.caches_text(v.sample.record.concept) for v in views):
            return None
        found = []
        for view in views:
            key = text_key(view.caption, text_id=self.cache.text_id)
            entry = read_entry(entry_path(self.cache.root, "text", key), key=key)
            if entry is None:
                return None
            found.append(entry)
        return {name: torch.stack([e[name] for e in found]) for name in found[0]}

    def _mask(self, view: View) -> torch.Tensor:
        placement, mask = view.placement, view.sample.record.mask
        if mask is not None:
            try:
                return load_mask(mask, placement)
            except ImageError as error:
                log.warning("mask %s unusable (%s); training the whole image", mask, error)
        return torch.ones(1, placement.bucket[1], placement.bucket[0])

    def load(self, draws: list[Draw]) -> Batch | None:
        """The Batch of `draws`, or None when no image of the batch's bucket can be read."""
        views = [self.view(d.index, d.seed) for d in draws if d.index not in self._bad]
        latents = self._cached_latents(views) if len(views) == len(draws) else None
        pixels = None
        if latents is None:
            loaded = [found for d in draws if (found := self._pixels(d)) is not None]
            if not loaded:
                return None
            views = [view for view, _ in loaded]
            pixels = torch.stack([p for _, p in loaded])
        bucket = views[0].placement.bucket
        concepts = [self.concepts[v.sample.record.concept] for v in views]
        weights = torch.tensor([c.loss_weight for c in concepts], dtype=torch.float32)
        has_masks = self.config.masked_training and any(v.sample.record.mask for v in views)
        return Batch(
            captions=[v.caption for v in views],
            original_sizes=torch.tensor([v.placement.original[::-1] for v in views]),
            crop_top_lefts=torch.tensor([v.placement.crop_top_left for v in views]),
            target_size=(bucket[1], bucket[0]),
            pixels=pixels,
            latent_mean=torch.stack([e["mean"] for e in latents]) if latents else None,
            latent_std=torch.stack([e["std"] for e in latents]) if latents else None,
            text=self._cached_text(views),
            masks=torch.stack([self._mask(v) for v in views]) if has_masks else None,
            loss_weights=None if bool((weights == 1).all()) else weights,
        )


class _Positions(torch.utils.data.Dataset):
    """Map-style view of the micro-batches from `start` on, for torch's DataLoader workers."""

    def __init__(self, order: DataOrder, loader: BatchLoader, start: int) -> None:
        self.order, self.loader, self.start = order, loader, start

    def __getitem__(self, offset: int) -> tuple[int, Batch | None]:
        epoch, draws = self.order.micro_batch(self.start + offset)
        return epoch, self.loader.load(draws)


class _Forever(torch.utils.data.Sampler):
    def __iter__(self) -> Iterator[int]:
        return itertools.count()


def _worker_init(_: int) -> None:
    # Ctrl-C is for the training process, which stops at a step boundary and writes a backup;
    # workers that died of it would turn that into a crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _keep(item: tuple[int, Batch | None]) -> tuple[int, Batch | None]:
    return item


def _read_ahead(dataset: _Positions, depth: int) -> Iterator[tuple[int, Batch | None]]:
    """Load the next `depth` micro-batches in one background thread (cache reads are mostly I/O)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geodesic-data")
    pending = collections.deque(pool.submit(dataset.__getitem__, i) for i in range(depth))
    try:
        for offset in itertools.count(depth):
            item = pending.popleft().result()
            pending.append(pool.submit(dataset.__getitem__, offset))
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def stream(
    order: DataOrder, loader: BatchLoader, *, start: int, workers: int
) -> Iterator[Iterator[tuple[int, Batch | None]]]:
    """(epoch, batch) for every micro-batch from `start` on, prefetched in the background.

    Images to decode go to `workers` processes. Batches served from the latent cache only read a
    few small files: a thread reads ahead instead, which costs the training step less than
    worker processes and their shared-memory hand-over.
    """
    dataset = _Positions(order, loader, start)
    if workers == 0:
        yield (dataset[offset] for offset in itertools.count())
        return
    if loader.caches_latents:
        batches = _read_ahead(dataset, depth=4)
        try:
            yield batches
        finally:
            batches.close()
        return
    data_loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=_Forever(),
        num_workers=workers,
        collate_fn=_keep,
        worker_init_fn=_worker_init,
        prefetch_factor=4,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator(),  # worker seeds must not draw from the training RNG stream
    )
    iterator = iter(data_loader)
    try:
        yield iterator
    finally:
        iterator._shutdown_workers()  # stop the workers now, not at garbage collection
