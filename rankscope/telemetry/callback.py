"""RankMonitorCallback: rank telemetry for any PEFT LoRA model trained with ``transformers.Trainer``.

    trainer = Trainer(model=peft_model, args=args, train_dataset=data, callbacks=[RankMonitorCallback(every=10)])

How the scalars reach the logs, with transformers' public callback API only: the Trainer calls
``on_log`` on its reporting integrations (TensorBoard, W&B, MLflow, ..., from ``args.report_to``)
before the callbacks a user passes, so keys added to ``logs`` by this callback reach
``state.log_history`` and the console (which run after it) but not those integrations. The
callback therefore reports its scalars to them itself, at the same step, through
transformers' own integration callbacks (``get_reporting_integration_callbacks``): one instance of
each, owned by this callback, given only the rank scalars (TensorBoard writes them, as ``train/rank/...``,
into the folder where the Trainer's own TensorBoard writer of this process writes; W&B and MLflow log into
the run the Trainer's callback opened).

Importing this module loads transformers; :mod:`rankscope.telemetry.monitor` does not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback, get_reporting_integration_callbacks
from transformers.integrations.integration_utils import default_logdir

from rankscope.errors import RankscopeError
from rankscope.telemetry.allocation import STALE_SCALAR, AllocationWatch
from rankscope.telemetry.monitor import RankMonitor

_NOT_REPORTED = ("eval_", "test_", "predict_")  # logs of evaluations: the rank scalars go with training logs


class RankMonitorCallback(TrainerCallback):
    """Rank telemetry for any PEFT LoRA model trained with ``transformers.Trainer`` (or TRL's trainers).

    Every ``every`` optimizer steps (and at the last step) it appends a record to
    ``output_dir/rank_trace.jsonl`` (None: the Trainer's ``args.output_dir``), and the median
    top-10% share, k95 / r and stable rank / r (and BeamLoRA's ranks operated) go into the
    Trainer's next training log: TensorBoard, W&B, MLflow, the console and ``state.log_history``.
    Only the main process writes (under FSDP2 every process measures with it). ``monitor_options`` go to
    :class:`RankMonitor`.

    An AdaLoRA or BeamLoRA model whose allocation has not changed by the step where it should have
    (AdaLoRA's first mask, at most ``tinit + deltaT``; BeamLoRA's first operation, Δt) gets one warning
    line naming the likely cause, through the monitor's ``log``, and ``rank/allocation_stale`` = 1 in
    the next training log (:mod:`rankscope.telemetry.allocation`).
    """

    def __init__(self, every: int = 10, output_dir: str | os.PathLike | None = None, **monitor_options: Any):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise RankscopeError(f"every={every!r}: expected a positive number of optimizer steps")
        self.every = every
        self.output_dir = output_dir
        self.monitor_options = monitor_options
        self.monitor: RankMonitor | None = None
        self._reporters: list[TrainerCallback] | None = None  # our own instances of args.report_to's callbacks
        self.allocation = AllocationWatch()
        self._stale_pending = False  # the warning was given; its scalar goes with the next training log

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is None:
            self.monitor = RankMonitor(self.output_dir if self.output_dir is not None else args.output_dir,
                                       **self.monitor_options)
        if model is not None:
            self.allocation.start(model, state.global_step)

    def _record(self, state, model) -> None:
        if self.monitor is None or self.monitor.last_step == state.global_step or model is None:
            return
        self.monitor.record(model, state.global_step, main_process=state.is_world_process_zero)

    def _check_allocation(self, state, model, final: bool = False) -> None:
        if not state.is_world_process_zero or self.allocation.warned:
            return
        message = self.allocation.check(model, state.global_step, final)
        if message is not None:
            self._stale_pending = True
            if self.monitor is not None:  # created at on_train_begin
                self.monitor.log(message)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self._record(state, model)
        self._check_allocation(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record(state, model)  # a run stopped early: its last state too
        self._check_allocation(state, model, final=True)
        for reporter in self._reporters or []:
            writer = getattr(reporter, "tb_writer", None)
            if writer is not None:
                writer.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is None or not isinstance(logs, dict) or any(k.startswith(_NOT_REPORTED) for k in logs):
            return
        scalars = self.monitor.take_pending() or {}
        if self._stale_pending:
            scalars[STALE_SCALAR] = 1.0
            self._stale_pending = False
        if not scalars:
            return
        # Trainer.log appended a copy of ``logs`` (with the step) to log_history just before this event.
        history = state.log_history[-1] if state.log_history else None
        if isinstance(history, dict) and history is not logs and history.get("step") == state.global_step \
                and set(history) - {"step"} == set(logs):
            history.update(scalars)
        logs.update(scalars)  # the console's printer runs after us and prints this dict
        if state.is_world_process_zero:
            self._report(args, state, control, scalars, **kwargs)

    def _report(self, args, state, control, scalars: dict[str, float], **kwargs) -> None:
        """The scalars to the reporting integrations, which saw ``logs`` before this callback did."""
        if self._reporters is None:
            self._reporters = [integration() for integration in get_reporting_integration_callbacks(args.report_to)]
            for reporter in self._reporters:
                if isinstance(reporter, TensorBoardCallback) and reporter.logging_dir is None:
                    reporter.logging_dir = _tensorboard_folder(args.output_dir)
        for reporter in self._reporters:
            reporter.on_log(args, state, control, logs=dict(scalars), **kwargs)


def _tensorboard_folder(output_dir: str) -> str:
    """Where the Trainer's TensorBoard callback of this process writes: the newest ``runs/*`` folder holding an
    event file of this process id (the file names end ``.<host>.<pid>.<n>``); a new one if there is none."""
    mine = [path.parent for path in (Path(output_dir) / "runs").glob(f"*/events.out.tfevents.*.{os.getpid()}.*")]
    if not mine:
        return os.path.join(output_dir, default_logdir())
    return str(max(mine, key=lambda folder: folder.stat().st_mtime))


__all__ = ["RankMonitorCallback"]
