"""Sparse training inside Hugging Face ``transformers.Trainer`` (and TRL's trainers built on it).

A ``TrainerCallback``, not a ``Trainer`` subclass: ``Trainer`` calls ``optimizer.step()`` itself,
but a RigL update iteration must not step the weights, and a callback can arrange that from
``on_pre_optimizer_step`` (the hook that runs after the backward passes and clipping, right
before the step) by making that one step of the plain optimizer update nothing
(:class:`fxsparse.integrations.common.SkippedStep`). Under fp16 the ``GradScaler`` still
unscales and updates as on every step; the learning-rate schedule advances, as the official
implementation's global step does. So the user keeps their own ``Trainer`` (or TRL's) and adds
one callback::

    sparse = fxsparse.sparsify(model, density=0.1, example_inputs=batch)
    trainer = transformers.Trainer(model=sparse, args=args, train_dataset=data,
                                   callbacks=[SparseTrainingCallback(delta_t=100)])
    trainer.train()

Steps are counted as ``Trainer`` counts them: one scheduler step per optimizer step, over
``TrainerState.max_steps`` (from ``max_steps``, or epochs x batches / accumulation / processes),
so ``end_fraction`` and ``delta_t`` are in optimizer steps with no arithmetic of the user's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fxsparse.safe_io import load_torch
from fxsparse.serialization import save_masks
from fxsparse.integrations.common import (
    SkippedStep, find_sparse, log_scalars, log_topology, make_scheduler, scheduler_options, tensorboard_writer,
    untie_shared_tensors,
)

__all__ = ["SparseTrainingCallback", "STATE_FILE", "save_model_files"]

STATE_FILE = "fxsparse_scheduler.pt"  # beside the model and optimizer in each checkpoint-N/


def save_model_files(sparse: Any, directory: str | os.PathLike[str]) -> None:
    """Writes what makes a directory holding ``Trainer``'s ``model.safetensors`` of a sparse
    module loadable by ``from_pretrained``: the model's ``config.json`` (and its generation
    config) and the masks (``fxsparse_masks.safetensors``). ``Trainer`` saves a module that is
    not a ``PreTrainedModel`` as its state dict only; that state dict holds the model's own keys
    (weights with their zeros) plus the masks, which ``from_pretrained`` reports as unexpected
    and ignores."""
    model = sparse.unwrap(share=True)
    config = getattr(model, "config", None)
    if callable(getattr(config, "save_pretrained", None)):
        config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(model, "can_generate", None)) and model.can_generate():
        generation.save_pretrained(directory)
    save_masks(sparse, directory)


class SparseTrainingCallback(TrainerCallback):
    """Runs a :class:`~fxsparse.TopologyScheduler` on the ``SparseGraphModule`` that ``Trainer``
    trains (passed as ``Trainer(model=...)``; found inside DDP and ``torch.compile`` wrappers).

    Args:
        method, delta_t, alpha, end_fraction, density, init, begin_step, growth_candidates:
            as :class:`~fxsparse.TopologyScheduler` (``delta_t`` and ``begin_step`` count
            optimizer steps, ``end_fraction`` is of ``TrainerState.max_steps``).
        resume_from: the checkpoint directory to take the scheduler's state from on a resumed
            run. Default: ``resume_from_checkpoint`` of the arguments, else
            ``<output_dir>/checkpoint-<global step>``, which is what ``trainer.train(
            resume_from_checkpoint=True)`` or a path into ``output_dir`` resumes from.

    Checkpoints: the masks are buffers of the model, saved and loaded with its weights by
    ``Trainer``; the scheduler's state (step count, update history, SNFS's momentum) is saved
    as ``fxsparse_scheduler.pt`` in each ``checkpoint-N`` directory and loaded on resume, so a
    resumed run makes the uninterrupted run's updates. A resumed run without that file raises.

    Saving: each ``checkpoint-N`` and, at the end of training, ``output_dir`` get the model's
    ``config.json``, its generation config and ``fxsparse_masks.safetensors``
    (:func:`save_model_files`), so that ``trainer.save_model()`` (into ``output_dir``) and every
    checkpoint load with ``AutoModel*.from_pretrained`` as the original class. For a clean
    directory anywhere (no mask keys in the weights file): ``trainer.model.save_pretrained(dir)``.
    The scheduler's file is read back with ``weights_only=True``: a checkpoint never runs code.

    Tied weights (an LM head sharing its input embedding): ``Trainer`` saves a model that is not
    a ``PreTrainedModel`` with safetensors, which refuses shared memory, so the callback gives the
    sparse module a state-dict hook that saves such a weight's second name as a copy
    (:func:`fxsparse.integrations.common.untie_shared_tensors`); loading writes both into the
    one parameter.

    TensorBoard: when ``report_to`` includes ``"tensorboard"`` (or ``tensorboard=True``) and it is
    installed, every topology update also writes each layer's density and its mask as an image
    (:func:`fxsparse.plot.log_tensorboard`) beside ``Trainer``'s own events
    (``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/fxsparse``).

    Logging: every training log gets ``fxsparse/density``, ``fxsparse/updates`` and the latest
    update's ``fxsparse/drop_fraction``, ``dropped``, ``grown`` and ``churn``
    (:meth:`~fxsparse.TopologyScheduler.stats`), in ``trainer.state.log_history`` and for every
    callback after this one. ``Trainer`` runs its reporting callbacks (TensorBoard, W&B) before
    those passed to it, so to have them record these too, put this callback first:
    ``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(SparseTrainingCallback))``.
    """

    def __init__(self, method: str = "rigl", *, resume_from: str | os.PathLike[str] | None = None,
                 tensorboard: bool | None = None, **options: Any) -> None:
        self.options = scheduler_options(method=method, **options)
        self.resume_from = resume_from
        self.tensorboard = tensorboard
        self.scheduler: Any = None
        self._skip: SkippedStep | None = None
        self._writer: Any = None
        self._logged = 0  # topology updates whose masks went to TensorBoard

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Any = None, **kwargs: Any) -> None:
        # Trainer saves a model that is not a PreTrainedModel with safetensors, which refuses
        # tensors sharing memory (tied embeddings): its state dict gets copies of those
        sparse = find_sparse(model)
        if untie_shared_tensors not in sparse._state_dict_hooks.values():
            sparse.register_state_dict_post_hook(untie_shared_tensors)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RuntimeError("fxsparse: Trainer gave the callback no model or optimizer at on_train_begin")
        self.scheduler = make_scheduler(model, optimizer, state.max_steps, self.options, getattr(optimizer, "scaler", None))
        if state.global_step > 0:  # resumed: Trainer has loaded the masks, weights and optimizer
            self.scheduler.load_state_dict(load_torch(self._state_path(args, state), what="the topology scheduler's state"))
        self._logged = len(self.scheduler.history)
        wanted = "tensorboard" in (args.report_to or []) if self.tensorboard is None else self.tensorboard
        if wanted and state.is_world_process_zero:
            # where Trainer's TensorBoardCallback writes: $TENSORBOARD_LOGGING_DIR, else output_dir/runs/
            self._writer = tensorboard_writer(os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs", "fxsparse"))

    def _state_path(self, args: TrainingArguments, state: TrainerState) -> str:
        directory = self.resume_from or args.resume_from_checkpoint
        if directory is None or directory is True:
            directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(os.fspath(directory), STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"fxsparse: training resumes at step {state.global_step} but {path} is missing, so the topology "
                "scheduler cannot resume where it stopped; pass SparseTrainingCallback(resume_from=<the checkpoint "
                "directory resumed from>), which must hold the fxsparse_scheduler.pt its run saved"
            )
        return path

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if not self.scheduler.step():  # the topology was updated: no weight step this iteration
            self._skip = SkippedStep(self.scheduler.optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._skip is not None:  # the step ran (or a GradScaler skipped it): undo either way
            self._skip.close()
            self._skip = None
        self._logged = log_topology(self._writer, self.scheduler, state.global_step, self._logged)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: Any = None, **kwargs: Any) -> None:
        if args.should_save and model is not None:  # what trainer.save_model() then completes in output_dir
            save_model_files(find_sparse(model), args.output_dir)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: Any = None, **kwargs: Any) -> None:
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(directory):
            torch.save(self.scheduler.state_dict(), os.path.join(directory, STATE_FILE))
            save_model_files(find_sparse(model), directory)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.scheduler is None or logs is None or "loss" not in logs:  # training logs only
            return
        scalars = log_scalars(self.scheduler)
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)
