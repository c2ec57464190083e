"""Filling the latent and text caches before training, then moving the encoders off the GPU.

Only entries that are missing or fail verification are encoded; images are decoded by DataLoader
workers while the VAE encodes the previous chunk. With several processes each rank fills its own
share of the (full, deterministic) job list, so no entry is skipped or encoded twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from modules.data.buckets import Placement, place
from modules.data.cache import entry_path, fingerprint, read_entry, write_entry
from modules.data.captions import caption_variants
from modules.data.images import ImageError, background_rgb, load_pixels
from modules.data.loader import BatchLoader, latent_key, text_key
from modules.data.scan import Sample
from modules.models.base import ModelFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentJob:
    sample: Sample
    placement: Placement
    path: Path
    key: str


def latent_jobs(loader: BatchLoader, latent_id: str) -> list[LatentJob]:
    """Every latent entry `loader` will read: each sample, center crop, and mirrored if flipping."""
    if not loader.caches_latents:
        return []
    flips = (False, True) if loader.augment and loader.config.flip else (False,)
    jobs = []
    for sample in loader.samples:
        for flip in flips:
            placement = place(
                sample.record.size, sample.bucket, random_crop=False, flip=flip, draws=(0, 0)
            )
            key = latent_key(
                sample, placement, latent_id=latent_id, background=loader.config.alpha_background
            )
            jobs.append(
                LatentJob(sample, placement, entry_path(loader.cache.root, "latents", key), key)
            )
    return jobs


def text_jobs(loader: BatchLoader, text_id: str) -> dict[str, tuple[Path, str]]:
    """Caption -> (entry path, key) for every caption `loader` can produce from the cache."""
    jobs = {}
    for sample in loader.samples:
        number = sample.record.concept
        if not loader.caches_text(number):
            continue
        concept = loader.concepts[number]
        captions = caption_variants(sample.record.caption, concept)
        for caption in captions if loader.augment else captions[:1]:
            key = text_key(caption, text_id=text_id)
            jobs[caption] = (entry_path(loader.cache.root, "text", key), key)
    return jobs


class _Decode(torch.utils.data.Dataset):
    """Chunks of same-bucket latent jobs decoded to pixels (in DataLoader workers)."""

    def __init__(self, chunks: list[list[LatentJob]], background: tuple[int, int, int]) -> None:
        self.chunks, self.background = chunks, background

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> tuple[list[LatentJob], torch.Tensor | None]:
        good, pixels = [], []
        for job in self.chunks[index]:
            try:
                pixels.append(
                    load_pixels(job.sample.record.path, job.placement, background=self.background)
                )
                good.append(job)
            except ImageError as error:
                log.warning("not cached %s: %s", job.sample.record.path, error)
        return good, torch.stack(pixels) if pixels else None


def _identity(item: object) -> object:
    return item


def _mine(items: list, accelerator: Accelerator) -> list:
    return items[accelerator.process_index :: accelerator.num_processes]


def _chunks(jobs: list[LatentJob], size: int) -> list[list[LatentJob]]:
    by_bucket: dict = {}
    for job in jobs:
        by_bucket.setdefault(job.placement.bucket, []).append(job)
    return [group[i : i + size] for group in by_bucket.values() for i in range(0, len(group), size)]


def fill_latent_cache(
    jobs: list[LatentJob],
    *,
    family: ModelFamily,
    model: nn.Module,
    accelerator: Accelerator,
    batch_size: int,
    workers: int,
    background: str,
) -> int:
    """Encode this rank's missing entries; returns how many were encoded."""
    missing = [job for job in _mine(jobs, accelerator) if read_entry(job.path, key=job.key) is None]
    if not missing:
        return 0
    decode = _Decode(_chunks(missing, batch_size), background_rgb(background))
    batches = torch.utils.data.DataLoader(
        decode,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        generator=torch.Generator(),  # leave the training RNG stream untouched
    )
    main = accelerator.is_local_main_process
    bar = tqdm(total=len(missing), desc="caching latents", unit="img", disable=not main)
    with bar:
        for good, pixels in batches:
            if pixels is not None:
                mean, std = family.encode_latents(model, pixels)
                for i, job in enumerate(good):
                    write_entry(job.path, {"mean": mean[i], "std": std[i]}, key=job.key)
            bar.update(len(good))
    return len(missing)


def fill_text_cache(
    jobs: dict[str, tuple[Path, str]],
    *,
    family: ModelFamily,
    model: nn.Module,
    accelerator: Accelerator,
    batch_size: int,
) -> int:
    mine = _mine(sorted(jobs), accelerator)
    missing = [c for c in mine if read_entry(jobs[c][0], key=jobs[c][1]) is None]
    main = accelerator.is_local_main_process and bool(missing)
    bar = tqdm(total=len(missing), desc="caching text", unit="caption", disable=not main)
    with bar, accelerator.autocast():
        for start in range(0, len(missing), batch_size):
            captions = missing[start : start + batch_size]
            encoded = family.encode_text(model, captions)
            for i, caption in enumerate(captions):
                path, key = jobs[caption]
                write_entry(path, {name: value[i] for name, value in encoded.items()}, key=key)
            bar.update(len(captions))
    return len(missing)


class EncoderPlacement:
    """Encoders moved to CPU memory after caching, and brought back while they are needed."""

    def __init__(self, modules: list[nn.Module], device: torch.device) -> None:
        self.modules, self.device = modules, device

    def offload(self) -> None:
        for module in self.modules:
            module.to("cpu")
        if self.modules and self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The offloaded encoders on the training device for the duration (sampling)."""
        for module in self.modules:
            module.to(self.device)
        try:
            yield
        finally:
            self.offload()


def build_caches(
    loaders: list[BatchLoader],
    *,
    family: ModelFamily,
    model: nn.Module,
    accelerator: Accelerator,
    batch_size: int,
    workers: int,
    offload: bool,
    text_trained: bool,
) -> EncoderPlacement:
    """Fill the caches `loaders` read (their CachePlan says which) and offload what is done."""
    plan = loaders[0].cache
    with torch.no_grad():
        if plan.latent_id is not None:
            jobs = [job for loader in loaders for job in latent_jobs(loader, plan.latent_id)]
            jobs = list({job.key: job for job in jobs}.values())
            fill_latent_cache(
                jobs,
                family=family,
                model=model,
                accelerator=accelerator,
                batch_size=batch_size,
                workers=workers,
                background=loaders[0].config.alpha_background,
            )
        if plan.text_id is not None:
            jobs = {}
            for loader in loaders:
                jobs.update(text_jobs(loader, plan.text_id))
            fill_text_cache(
                jobs, family=family, model=model, accelerator=accelerator, batch_size=batch_size
            )
    accelerator.wait_for_everyone()
    movable: list[nn.Module] = []
    if offload and all(loader.caches_latents for loader in loaders):
        movable.append(family.latent_encoder(model))
    all_text = all(
        loader.caches_text(s.record.concept) for loader in loaders for s in loader.samples
    )
    if offload and all_text and not text_trained:
        movable += family.text_encoders(model)
    placement = EncoderPlacement(
        movable if accelerator.device.type != "cpu" else [], accelerator.device
    )
    placement.offload()
    return placement


def encoder_ids(family: ModelFamily, model: nn.Module, *, mixed_precision: str) -> tuple[str, str]:
    """Fingerprints of the VAE and of the text encoders (with the autocast they run under)."""
    latent = fingerprint([family.latent_encoder(model)], extra=f"{family.name}/latent")
    settings = family.text_cache_key(model)
    extra = f"{family.name}/text/{mixed_precision}" + (f"/{settings}" if settings else "")
    text = fingerprint(family.text_encoders(model), extra=extra)
    return latent, text
