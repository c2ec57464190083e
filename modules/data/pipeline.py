"""The data pipeline as the trainer uses it: scan, shard, fill caches, stream micro-batches.

Construction scans (a UserError before any model loads); `shard` fixes this process's data
order; `prepare` fills the latent / text caches with the encoders alone on the device (the
trainer moves the denoiser there afterwards); `stream` yields
(epoch, batch) from a micro-batch position on, read ahead in the background.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from modules.config.schema import TrainConfig
from modules.data.cache import cache_root
from modules.data.caching import EncoderPlacement, build_caches, encoder_ids
from modules.data.loader import BatchLoader, CachePlan, stream
from modules.data.scan import Dataset, ScanIndex, scan_concepts
from modules.errors import UserError
from modules.models.base import Batch, ModelFamily
from modules.training.data_order import DataOrder, Draw

log = logging.getLogger(__name__)


class DataPipeline:
    def __init__(self, config: TrainConfig, *, latent_multiple: int) -> None:
        self.config = config
        data = config.data
        workspace = Path(config.output.workspace_dir).expanduser()
        self.cache_root = cache_root(cache_dir=data.cache_dir, workspace=workspace)
        index = ScanIndex(self.cache_root / "scan-index.json")
        self.train: Dataset = scan_concepts(
            data.concepts, data, key="data.concepts", step=latent_multiple, index=index
        )
        self.validation: Dataset | None = None
        if data.validation.concepts:
            self.validation = scan_concepts(
                data.validation.concepts,
                data,
                key="data.validation.concepts",
                step=latent_multiple,
                index=index,
            )
        self.train_loader = BatchLoader(
            self.train.samples, data, self.train.concepts, cache=None, augment=True
        )
        self.validation_loader = (
            BatchLoader(
                self.validation.samples, data, self.validation.concepts, cache=None, augment=False
            )
            if self.validation
            else None
        )
        self.order: DataOrder | None = None
        self.encoders = EncoderPlacement([], torch.device("cpu"))
        self._validation_batches: list[Batch] | None = None

    def report_lines(self) -> list[str]:
        """The scan report: images per concept, skipped files with reasons, bucket counts."""
        lines = self.train.report_lines("data")
        if self.validation is not None:
            lines += self.validation.report_lines("validation data")
        return lines

    def shard(self, *, batch_size: int, seed: int, rank: int, world: int) -> DataOrder:
        per_bucket: dict[object, int] = {}
        for group in self.train.groups:
            per_bucket[group.bucket] = per_bucket.get(group.bucket, 0) + group.per_epoch
        per_epoch, fullest = sum(per_bucket.values()), max(per_bucket.values())
        if batch_size > per_epoch:
            raise UserError(
                f"training.batch_size = {batch_size} is larger than the dataset ({per_epoch} "
                f"images per epoch); lower it to {per_epoch} or less"
            )
        if batch_size > fullest:
            log.warning(
                "training.batch_size = %d is more than any bucket holds (the fullest has %d images "
                "per epoch), so every batch is smaller than that",
                batch_size,
                fullest,
            )
        self.order = DataOrder(
            self.train.groups,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world=world,
            drop_last=self.config.data.drop_last,
        )
        if self.order.micro_per_epoch == 0:
            raise UserError(
                f"data.drop_last: no bucket holds a full batch of training.batch_size={batch_size} "
                "images; lower the batch size or set data.drop_last false"
            )
        return self.order

    def prepare(self, *, family: ModelFamily, model: nn.Module, accelerator: Accelerator) -> None:
        """Fill the latent / text caches the config asks for and point the loaders at them.

        The encoders they need come to the device here, before the denoiser does (a quantized
        Flux transformer and T5-XXL together would not fit a 16 GB card); those done with leave
        it again (`self.encoders`)."""
        config, data = self.config, self.config.data
        text_trained = config.model.trains_text_encoder()
        cache_text = data.cache_text_embeddings and not text_trained
        if not (data.cache_latents or cache_text):
            return
        encoders = [family.latent_encoder(model)] if data.cache_latents else []
        encoders += family.text_encoders(model) if cache_text else []
        for encoder in encoders:
            encoder.to(accelerator.device)
        latent_id, text_id = encoder_ids(
            family, model, mixed_precision=config.training.mixed_precision
        )
        plan = CachePlan(
            root=self.cache_root,
            latent_id=latent_id if data.cache_latents else None,
            text_id=text_id if cache_text else None,
        )
        loaders = [self.train_loader]
        if self.validation_loader is not None:
            loaders.append(self.validation_loader)
        for loader in loaders:
            loader.cache = plan
        self.encoders = build_caches(
            loaders,
            family=family,
            model=model,
            accelerator=accelerator,
            batch_size=config.training.batch_size,
            workers=data.workers,
            offload=data.offload_encoders,
            text_trained=text_trained,
        )

    def stream(self, *, start: int) -> AbstractContextManager[Iterator[tuple[int, Batch | None]]]:
        """(epoch, batch) from micro-batch `start` on, prefetched by the loader workers."""
        return stream(self.order, self.train_loader, start=start, workers=self.config.data.workers)

    def load(self, position: int) -> tuple[int, Batch | None]:
        """The micro-batch at `position`, loaded here and now."""
        epoch, draws = self.order.micro_batch(position)
        return epoch, self.train_loader.load(draws)

    def validation_batches(self) -> list[Batch]:
        """The validation set as fixed batches (center crops, plain captions), loaded once."""
        if self.validation_loader is None:
            return []
        if self._validation_batches is None:
            samples = self.validation_loader.samples
            ordered = sorted(range(len(samples)), key=lambda i: (samples[i].bucket, i))
            size = self.config.training.batch_size
            batches = []
            for bucket in dict.fromkeys(samples[i].bucket for i in ordered):
                members = [i for i in ordered if samples[i].bucket == bucket]
                for start in range(0, len(members), size):
                    draws = [Draw(i, (0,)) for i in members[start : start + size]]
                    batch = self.validation_loader.load(draws)
                    if batch is not None:
                        batches.append(batch)
            self._validation_batches = batches
        return self._validation_batches
