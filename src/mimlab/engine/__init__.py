"""A small, task-agnostic training engine shared by `mimlab pretrain` and `mimlab transfer`.

Contract
--------
::

    from mimlab.engine import TrainConfig, Callback, SeededDataset, train, seed_everything

    seed_everything(cfg.seed)                 # before building the model: identical init on every rank
    model = ...                               # any nn.Module (not yet on the device, not wrapped)
    def loss_fn(net, batch):                  # net: the (DDP-/compile-)wrapped model; call it, not `model`
        loss = ...                            # scalar tensor, mean over this micro-batch
        return loss, {"acc": acc}             # or just `loss`; extra scalars are logged per step
    result = train(model, loss_fn, dataset, cfg, collate_fn=None, param_groups=None,
                   callbacks=[Callback("probe", every=100, fn=probe_fn)], extra_state={...})

`train` moves `model` to the device, trains it in place for ``cfg.steps`` optimizer steps and returns a
`TrainResult` (step, per-step losses, img/s, checkpoint path, skipped samples). It does:

* **Optimizer**: AdamW (fused when the platform supports it) over `param_groups`, by default the official
  SimMIM/timm split (`param_groups_weight_decay`): no weight decay on 1-d tensors (biases, norms, LayerScale),
  position embeddings, cls/dist/register/mask tokens, relative-position tables and the model's own
  ``no_weight_decay()`` names. Caller groups (e.g. timm ``param_groups_layer_decay``) may carry ``lr_scale``.
* **Schedule**: `lr_at` (linear warmup, then cosine / step / constant), set on every step.
* **Numerics**: autocast bf16/fp16 (GradScaler for fp16), grad clipping (the global grad norm is logged every
  step), gradient accumulation (``cfg.accum_steps``; DDP gradients are synced only on the last micro-step),
  optional ``torch.compile``, optional EMA (timm ``ModelEmaV3``), deterministic mode.
* **Data**: a `StepBatchSampler` whose order depends only on (seed, epoch) and whose position is the step
  count; `SeededDataset` subclasses get a per-sample augmentation seed (``mix_seed(seed, epoch, index)``), so
  augmentation, masks and order are identical with 1 or N processes, any number of workers, and after resume.
  ``cfg.batch_size`` is the GLOBAL batch. One DataLoader iterator spans the whole run (``cfg.num_workers``
  workers live across epochs; pinned memory on CUDA; ``cfg.prefetch_factor``). A dict batch may carry ``"_skipped"`` (per-sample counts of
  unreadable files that the dataset replaced); they are summed into ``result.skipped_samples``.
* **Logs**: ``out_dir/metrics.csv`` (one row per step: step, loss, lr, grad_norm, the loss_fn's extra scalars,
  epoch, img_per_s, time_s), TensorBoard under ``out_dir/tensorboard``, a tqdm bar (loss, lr, img/s, ETA).
  The host syncs only every ``cfg.log_every`` steps (and before every checkpoint/callback).
* **Checkpoints**: ``out_dir/checkpoints/last.pt`` every ``cfg.save_every`` steps and at the end, written
  atomically (temp file + rename): model, optimizer, scaler, EMA, RNG states of every rank (python, numpy,
  torch, cuda), step, data position, the run identity and ``extra_state``. The lr schedule is a pure function of
  the step, so it needs no state. The file holds tensors and plain data only (RNG states as tensors/ints) and
  is read with ``torch.load(weights_only=True)``, so a crafted checkpoint cannot run code; a full disk raises a
  one-line `MimlabError` and leaves the previous checkpoint in place.
* **Resume**: ``cfg.resume`` continues exactly from the checkpoint (bitwise on deterministic CPU runs);
  rows of the CSV logs past the checkpoint are dropped and rewritten. ``cfg.identity`` (plus batch size, seed,
  dataset length) must match the checkpoint's. Without a checkpoint, ``resume`` starts from step 0.
  An out dir holding another run's checkpoint is refused unless ``resume`` or ``overwrite`` (which deletes only
  the run's own outputs: checkpoints/, metrics.csv, tensorboard/, callback CSVs, ``cfg.owned_outputs``).
* **NaN/inf**: a non-finite loss (or grad norm outside fp16) raises `NonFiniteLossError` (a `MimlabError`)
  naming the step; checks happen before every checkpoint, so the last checkpoint on disk is always finite.
* **DDP**: with torchrun's variables (WORLD_SIZE > 1) a process group is created (nccl on CUDA, gloo on CPU)
  and the model wrapped in DistributedDataParallel; the same command runs with 1 or N processes.
* **Callbacks**: `Callback(name, every, fn)`; ``fn(ctx)`` runs on the bare model in eval mode under no_grad
  with RNG states isolated (training is unaffected), and may return a row (or rows) of scalars logged to
  ``out_dir/<name>.csv`` and TensorBoard.
"""
from mimlab.engine.config import Callback, CallbackContext, TrainConfig, TrainResult
from mimlab.engine.dist import DistInfo, resolve_device, setup_distributed
from mimlab.engine.loop import NonFiniteLossError, autocast_context, to_device, train
from mimlab.engine.optim import build_adamw, param_groups_weight_decay, wants_decay
from mimlab.engine.sampler import SampleKey, SeededDataset, StepBatchSampler, epoch_order, mix_seed
from mimlab.engine.schedule import lr_at
from mimlab.engine.state import capture_rng, load_checkpoint, restore_rng, save_checkpoint, seed_everything

__all__ = [
    "Callback", "CallbackContext", "TrainConfig", "TrainResult", "DistInfo", "resolve_device",
    "setup_distributed", "NonFiniteLossError", "autocast_context", "to_device", "train", "build_adamw",
    "param_groups_weight_decay", "wants_decay", "SampleKey", "SeededDataset", "StepBatchSampler", "epoch_order",
    "mix_seed", "lr_at", "capture_rng", "load_checkpoint", "restore_rng", "save_checkpoint", "seed_everything",
]
