"""The training run: set up, loop over micro-batches, log, sample, back up, save.

Reads top to bottom like a diffusers training example; the update itself lives in
GradientPipeline, the LoRA network in network_setup.py, backups in backup.py, data order in
data_order.py and the family-specific math in modules/models.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from modules.config.advice import advice
from modules.config.loading import config_to_json, save_config
from modules.config.local_paths import shareable_config
from modules.config.schema import TrainConfig
from modules.data.pipeline import DataPipeline
from modules.errors import RunError
from modules.lora.formats import build_metadata, network_dim, save_lora
from modules.models.placement import to_device_except
from modules.models.registry import get_family
from modules.sampling.sampler import write_comparison, write_samples
from modules.training import events, nonfinite
from modules.training.backup import (
    Progress,
    TrainingState,
    backups_dir,
    find_backup,
    nonfinite_tensors,
    read_backup,
    write_backup,
)
from modules.training.gradient_pipeline import GradientPipeline, StepOutcome
from modules.training.loss_curve import write_loss_curve
from modules.training.memory import memory_estimate
from modules.training.network_setup import TrainingModel, build_network
from modules.training.optimizers import (
    check_optimizer,
    create_optimizer,
    create_scheduler,
    lora_param_groups,
    optimizer_kwargs,
)
from modules.training.preconditioning import attach_preconditioner
from modules.training.resume import plan_resume
from modules.training.run_log import RunLog
from modules.training.run_paths import RunPaths
from modules.training.stop import StopSignal
from modules.training.validation import ValidationLog, validation_loss
from modules.util.atomic import remove_leftovers
from modules.util.dtypes import DTYPES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    paths: RunPaths
    steps: int
    interrupted: bool
    last_backup: Path | None
    comparison: Path | None = None  # the before/after grid, when written
    loss_curve: Path | None = None  # the loss curve PNG, when written


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


class TrainingRun:
    """One run of a config; `run()` trains until done or until the StopSignal is set.

    `on_event` receives progress events (modules/training/events.py) for a watcher such as the
    GUI; the CLI leaves it out.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: str | None = None,
        resume_latest: bool = False,
        on_event: events.EventSink = events.ignore,
    ) -> None:
        self.config = config
        self.on_event = on_event
        self.paths = RunPaths.from_config(config)
        # bad data fails here, before any model loads
        on_event(events.Phase("scanning the data"))
        self.dataset = DataPipeline(
            config, latent_multiple=get_family(config.model.family).latent_multiple
        )
        resume_path = (
            find_backup(self.paths.workspace, resume) if (resume or resume_latest) else None
        )
        # a damaged backup or a setting it cannot continue with fails here too, before the model
        backup, resume_plan = (
            plan_resume(resume_path, config=config, dataset=self.dataset.train.fingerprint())
            if resume_path is not None
            else (None, None)
        )
        # AcceleratorState is a process-wide singleton; each run (tests, the GUI) sets its own
        # precision, keeping the distributed PartialState that `accelerate launch` set up.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(mixed_precision=config.training.mixed_precision)
        if self.accelerator.is_main_process:
            self._say(*self.dataset.report_lines())
            for line in resume_plan.warnings if resume_plan else []:
                log.warning("%s", line)
                on_event(events.Notice(line))
            for line in resume_plan.notes if resume_plan else []:
                log.info("%s", line)
            self._say(*(f"advice: {line}" for line in advice(config)))
        self.data = self.dataset.shard(
            batch_size=config.training.batch_size,
            seed=config.training.seed,
            rank=self.accelerator.process_index,
            world=self.accelerator.num_processes,
        )
        check_optimizer(config.optimizer, self.accelerator.device)
        torch.manual_seed(config.training.seed)
        self.family = get_family(config.model.family)
        on_event(events.Phase("loading the base model"))
        self.base = self.family.load(config)
        if self.accelerator.is_main_process:  # before anything is on the GPU
            estimate = memory_estimate(
                family=self.family, base=self.base, config=config, device=self.accelerator.device
            )
            if estimate is not None:
                self._say(*estimate.lines())
        self.network = build_network(
            config=config,
            family=self.family,
            base=self.base,
            announce=self.accelerator.is_main_process,
        )
        self.total_steps = config.training.max_steps or math.ceil(
            config.training.epochs
            * self.data.micro_per_epoch
            / config.training.gradient_accumulation_steps
        )
        # The caches fill with only the encoders on the device; the rest of the model follows
        # without those done with: a quantized Flux transformer next to T5-XXL would not fit a
        # 16 GB card.
        on_event(events.Phase("filling the latent and text caches"))
        self.dataset.prepare(family=self.family, model=self.base, accelerator=self.accelerator)
        to_device_except(self.base, self.accelerator.device, away=self.dataset.encoders.modules)
        model = TrainingModel(
            family=self.family, base=self.base, network=self.network, config=config
        )
        optimizer = create_optimizer(config.optimizer, self._param_groups())
        scheduler = create_scheduler(config.scheduler, optimizer, total_steps=self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # the torch optimizer itself, not accelerate's wrapper around it, and after prepare: its
        # statistics buffers live where the factors finally do
        self.preconditioner = attach_preconditioner(
            config=config, network=self.network, optimizer=optimizer, accelerator=self.accelerator
        )
        self.pipeline = GradientPipeline(
            accelerator=self.accelerator,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=scheduler,
            parameters=list(self.network.parameters()),
            accumulation_steps=config.training.gradient_accumulation_steps,
            max_grad_norm=config.training.max_grad_norm,
        )
        self.state = TrainingState(
            network=self.network,
            optimizer=self.optimizer,
            scheduler=scheduler,
            progress=Progress(),
            scaler=self.accelerator.scaler,
            preconditioner=self.preconditioner,
        )
        # reseeded per micro-batch from its place in the data order (DataOrder.noise_seed)
        self._noise = torch.Generator()
        self.config_json = config_to_json(config)
        self.last_backup: Path | None = None
        if backup is not None:
            # the configured optimizer settings (lr included) win over the backup's
            read_backup(self.state, backup, settings=optimizer_kwargs(config.optimizer).keys())
            self.last_backup = backup.path
            log.info("resumed from %s at step %d", backup.path, self.state.progress.step)
        self.validation_log: ValidationLog | None = None

    def _param_groups(self) -> list[dict]:
        return lora_param_groups(network=self.network, config=self.config)

    # -- the loop ---------------------------------------------------------------------------------

    def run(
        self, stop: StopSignal | None = None, commands: events.RunCommands | None = None
    ) -> RunResult:
        """Train; `commands` (sample, backup, stop) are obeyed at optimizer-step boundaries."""
        stop = stop or StopSignal()
        commands = commands or events.RunCommands()
        progress = self.state.progress
        main = self.accelerator.is_main_process
        if main:
            self._remove_leftovers()
            save_config(self.config, self.paths.workspace / "config.json")
            self._say(
                f"training {len(self.network.adapters)} LoRA layers for {self.total_steps} steps "
                f"({len(self.dataset.train.samples)} images, "
                f"{self.data.micro_per_epoch} micro-batches/epoch)"
            )
        run_log = RunLog(
            logs_dir=self.paths.logs,
            total_steps=self.total_steps,
            initial_step=progress.step,
            enabled=main,
            bar_factory=tqdm,
            on_event=self.on_event,
        )
        self.on_event(events.Started(step=progress.step, total_steps=self.total_steps))
        start = progress.micro_batches
        # the bar is closed however the loop ends, so an error prints on a line of its own
        with run_log, stop.installed(), self.dataset.stream(start=start) as batches:
            while progress.step < self.total_steps and not stop.requested:
                epoch, batch = next(batches)
                progress.micro_batches += 1
                if batch is None:
                    continue
                noise = self._noise.manual_seed(self.data.noise_seed(progress.micro_batches - 1))
                with self.pipeline.micro_batch():
                    loss = self.model(batch, noise)
                self.pipeline.backward(loss)
                if self.pipeline.ready:
                    outcome = self.pipeline.step()
                    progress.step += 1
                    self._check_finite(outcome)
                    lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
                    run_log.step(
                        step=progress.step,
                        epoch=epoch,
                        outcome=outcome,
                        lrs=lrs,
                        skipped=progress.skipped_steps,
                    )
                    self._periodic(progress.step)
                    self._obey(commands.take(), stop)
        if stop.requested and progress.step < self.total_steps:
            if self.config.backup.on_interrupt:
                self.backup()
            return self._result(interrupted=True)
        self.on_event(events.Phase("saving the LoRA"))
        self.save(self.paths.output, final=True)
        self.validate(progress.step)
        if self.validation_log is not None:
            self.validation_log.close()
        if self.config.sampling.at_end:
            self.sample(progress.step)
        comparison, loss_curve = self._end_pictures()
        self.accelerator.end_training()
        result = self._result(interrupted=False)
        return dataclasses.replace(result, comparison=comparison, loss_curve=loss_curve)

    def _check_finite(self, outcome: StepOutcome) -> None:
        if outcome.finite:
            return
        progress = self.state.progress
        if self.config.training.on_nonfinite == "skip":
            progress.skipped_steps += 1
            return
        raise RunError(
            nonfinite.step_message(
                config=self.config,
                step=progress.step,
                loss=outcome.loss,
                grad_norm=outcome.grad_norm,
                updates_before=progress.step - 1 - progress.skipped_steps,
                weights_finite=not nonfinite_tensors(self.network.state_dict()),
                last_backup=self.last_backup,
                scale=nonfinite.lora_scale(self.network),
            )
        )

    def _remove_leftovers(self) -> None:
        """Delete what killed writes left behind (partial backups and saves: large at SDXL
        scale). The cache is shared with other runs: only its long-abandoned files go."""
        workspace, output = self.paths.workspace, self.paths.output
        freed = sum(
            [
                remove_leftovers(workspace),
                remove_leftovers(workspace / "saves"),
                remove_leftovers(backups_dir(workspace)),
                remove_leftovers(self.paths.samples, recursive=True),
                remove_leftovers(output.parent, prefix=f".{output.name}."),
                remove_leftovers(self.dataset.cache_root, recursive=True, older_than_s=3600),
            ]
        )
        if freed:
            log.info("removed %.1f MB of files left by an interrupted run", freed / 2**20)

    def _periodic(self, step: int) -> None:
        config = self.config
        if step < self.total_steps and _every(step, config.sampling.every_n_steps):
            self.sample(step)
        if step < self.total_steps and _every(step, config.output.save_every_n_steps):
            name = f"{config.output.name}-step{step:06d}.safetensors"
            self.save(self.paths.workspace / "saves" / name)
        if step < self.total_steps and _every(step, config.data.validation.every_n_steps):
            self.validate(step)
        if _every(step, config.backup.every_n_steps):
            self.backup()

    def _obey(self, commands: list[events.Command], stop: StopSignal) -> None:
        for command in commands:
            if command is events.Command.SAMPLE:
                self.sample(self.state.progress.step)
            elif command is events.Command.BACKUP:
                self.backup()
            elif command is events.Command.STOP:
                stop.request()

    def _say(self, *lines: str) -> None:
        """Print for the console and tell the watcher the same lines."""
        print("\n".join(lines), flush=True)
        for line in lines:
            self.on_event(events.Notice(line))

    def _result(self, *, interrupted: bool) -> RunResult:
        return RunResult(
            paths=self.paths,
            steps=self.state.progress.step,
            interrupted=interrupted,
            last_backup=self.last_backup,
        )

    # -- outputs ----------------------------------------------------------------------------------

    def backup(self) -> None:
        # a backup must be one to go on from; every rank checks, so all of them stop together
        if nonfinite_tensors(self.network.state_dict()):
            raise RunError(
                nonfinite.weights_message(
                    step=self.state.progress.step, config=self.config, last_backup=self.last_backup
                )
            )
        if not self.accelerator.is_main_process:
            return
        self.last_backup = write_backup(
            self.state,
            workspace=self.paths.workspace,
            config_json=self.config_json,
            dataset=self.dataset.train.fingerprint(),
            keep_last=self.config.backup.keep_last,
        )
        self.on_event(events.BackupWritten(self.state.progress.step, self.last_backup))

    def save(self, path: Path, *, final: bool = False) -> None:
        config = self.config
        nonfinite.check_saveable(  # on every rank, so all of them stop together
            self.network,
            path=path,
            config=config,
            step=self.state.progress.step,
            last_backup=self.last_backup,
        )
        if not self.accelerator.is_main_process:
            return
        rank, alpha = network_dim(self.network)  # a continued file may bring its own
        metadata = build_metadata(
            # the training settings travel with the file; the user's folders do not
            config_json=json.dumps(shareable_config(config)),
            rank=rank,
            alpha=alpha,
            base_model_version=self.family.identity.base_model_version,
            architecture=self.family.identity.architecture,
            title=config.output.name,
            resolution=config.data.resolution,
            trigger_phrase=config.output.trigger_phrase,
        )
        save_lora(
            self.network,
            path,
            layout=config.output.format,
            metadata=metadata,
            dtype=DTYPES[config.output.save_dtype],
        )
        self.on_event(events.LoRASaved(self.state.progress.step, path, final=final))

    def validate(self, step: int) -> None:
        """Log the validation loss (main process; other ranks go on to the next step)."""
        if not (self.accelerator.is_main_process and self.dataset.validation):
            return
        loss = validation_loss(
            family=self.family,
            base=self.base,
            pipeline=self.dataset,
            config=self.config,
            accelerator=self.accelerator,
        )
        if loss is not None:
            self.validation_log = self.validation_log or ValidationLog(self.paths.logs)
            self.validation_log.record(step, loss)
            self.on_event(events.ValidationMeasured(step, loss))

    def sample(self, step: int) -> None:
        if self.accelerator.is_main_process:
            with self.dataset.encoders.on_device():  # offloaded encoders visit the GPU
                paths = write_samples(
                    family=self.family,
                    base=self.base,
                    config=self.config.sampling,
                    resolution=self.config.data.resolution,
                    folder=self.paths.samples / f"{step:06d}",
                )
            if paths:
                self.on_event(events.SamplesWritten(step, tuple(paths)))

    def _end_pictures(self) -> tuple[Path | None, Path | None]:
        """The before/after grid and the loss curve, as the config asks (main process)."""
        comparison = loss_curve = None
        if not self.accelerator.is_main_process:
            return comparison, loss_curve
        if self.config.sampling.before_after:
            with self.dataset.encoders.on_device():
                comparison = write_comparison(
                    family=self.family,
                    base=self.base,
                    network=self.network,
                    config=self.config.sampling,
                    resolution=self.config.data.resolution,
                    path=self.paths.comparison,
                )
        if self.config.output.loss_curve:
            loss_curve = write_loss_curve(
                self.paths.logs, self.paths.loss_curve, title=self.config.output.name
            )
        return comparison, loss_curve


def train(
    config: TrainConfig,
    *,
    resume: str | None = None,
    resume_latest: bool = False,
    stop: StopSignal | None = None,
) -> RunResult:
    """Train a LoRA as configured; `resume`/`resume_latest` continue from a backup."""
    return TrainingRun(config, resume=resume, resume_latest=resume_latest).run(stop)
