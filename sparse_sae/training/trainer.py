"""The trainer: Adam with learning-rate warm-up and decay, penalty-coefficient warm-up, gradient
clipping, the unit-norm decoder constraint, dead-latent tracking (which feeds AuxK), bf16 autocast
on GPU, data parallelism, metrics, checkpoints and an exact resume.

>>> from sparse_sae.training.config import TrainConfig
>>> from sparse_sae.training.trainer import Trainer
>>> trainer = Trainer(TrainConfig(data="acts/", k=32, steps=10_000, out_dir="runs/a"))
>>> metrics = trainer.fit()          # checkpoints in runs/a/checkpoints, metrics in runs/a/metrics.jsonl
>>> Trainer(cfg, resume="runs/a").fit()   # continues where the last checkpoint stopped

On the CPU a resumed run reproduces the uninterrupted run's losses bit for bit: the parameters,
the optimizer moments, the dead-latent counters, the data position and the RNG states are all
in the checkpoint, and the schedules are functions of the step.

A run directory belongs to one process at a time (:class:`~sparse_sae.training.run_lock.RunLock`, taken by
the main process for the trainer's life); a new run refuses a directory that already holds a
run's checkpoints, final SAE or metrics, and a resumed run writes only into its own directory.
"""
from __future__ import annotations

import contextlib
import functools
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sparse_sae import ops
from sparse_sae.saes import BatchTopKSAE, ShardedTopKSAE, load
from sparse_sae.saes.sharded import SLICED, run_on_every_rank, shard_bounds
from sparse_sae.training import distributed
from sparse_sae.training.checkpoint import (
    CHECKPOINTS,
    begin_checkpoint,
    checkpoint_tmp_dir,
    commit_checkpoint,
    read_checkpoint,
    read_optimizer_rows,
    save_checkpoint,
    verify_checkpoint,
    write_optimizer_shard,
)
from sparse_sae.training.config import TrainConfig
from sparse_sae.training.data import (
    ActivationLoader,
    NonFiniteDataError,
    activations_metadata,
    check_finite_rows,
    open_source,
)
from sparse_sae.training.metrics_log import MetricsLog
from sparse_sae.training.prefetch import PrefetchingLoader
from sparse_sae.training.run_lock import RunLock, RunLockedError

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN or infinite loss; the last good checkpoint is kept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, constant, then linear decay to zero after
    ``decay_start * steps``. ``step`` counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = int(cfg.decay_start * cfg.steps)
    if step < start:
        return cfg.lr
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - start))


def penalty_scale_at(step: int, cfg: TrainConfig) -> float:
    """The factor on every penalty coefficient: a linear ramp from 0 to 1 over ``penalty_warmup_steps``."""
    if cfg.penalty_warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / cfg.penalty_warmup_steps)


def input_scale_for(rows: torch.Tensor) -> float:
    """The factor that gives ``rows`` unit mean norm."""
    norm = float(rows.float().norm(dim=1).mean())
    if not math.isfinite(norm) or norm <= 0:
        raise ValueError(f"cannot normalise inputs: the mean row norm of the data is {norm}")
    return 1.0 / norm


def run_dir_of(resume) -> Path | None:
    """The run directory that ``resume`` (a run directory or one of its checkpoints) belongs to;
    None for a checkpoint directory that stands alone."""
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir():
        return path
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent
    return None


def _run_contents(out_dir) -> list:
    """What in ``out_dir`` belongs to a run: checkpoints, a final SAE, metrics."""
    out = Path(out_dir)
    found = []
    root = out / CHECKPOINTS
    if root.is_dir() and any(p.name.startswith("step_") or p.name == "latest" for p in root.iterdir()):
        found.append("checkpoints")
    if (out / FINAL_DIR).is_dir() and any((out / FINAL_DIR).iterdir()):
        found.append("a final SAE")
    if (out / METRICS_FILE).is_file() and (out / METRICS_FILE).stat().st_size > 0:
        found.append("metrics")
    return found


def _same_dir(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """Trains an SAE described by ``cfg`` on ``data`` (anything :func:`~sparse_sae.training.data.open_source`
    takes; default ``cfg.data``).

    ``sae`` trains a given module instead of building one from ``cfg``. ``resume`` (a run
    directory or a checkpoint) continues a run; its configuration must match ``cfg`` except for
    the fields in :data:`sparse_sae.training.config.RUN_FIELDS`. ``cfg.out_dir=None`` writes nothing.
    ``on_step(trainer)`` is called after every step (``trainer.step`` completed steps).
    """

    def __init__(self, cfg: TrainConfig, data=None, *, sae=None, resume=None,
                 on_step: Callable | None = None, desc: str = "train"):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg, self.on_step, self.desc = cfg, on_step, desc
        self.device = distributed.device_for(cfg.device)
        self.ctx = distributed.init(self.device, cfg.latent_parallel)
        data = data if data is not None else cfg.data
        if data is None:
            raise ValueError("no training data: pass data= or set cfg.data to a path")
        self.source = open_source(data, cfg.data_key)
        if cfg.batch_size > self.source.n_rows:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {self.source.n_rows} rows of the data: every "
                             f"batch would repeat rows; lower batch_size or add data")
        self.activations = activations_metadata(data)     # kept with the final SAE, for export
        if resume is not None and cfg.out_dir is not None:
            run_dir = run_dir_of(resume)
            if run_dir is not None and not _same_dir(run_dir, cfg.out_dir):
                raise ValueError(f"cannot resume {resume} into out_dir {cfg.out_dir}: a resumed run writes only "
                                 f"into its own run directory; set out_dir to {run_dir} (or leave it unset on "
                                 f"the command line)")
        self._lock = RunLock(cfg.out_dir) if cfg.out_dir is not None and self.ctx.is_main else None
        self._take_run_dir()
        try:
            self._setup(sae, resume)
        except BaseException:
            self.release()
            raise

    def _take_run_dir(self) -> None:
        """The main process locks ``out_dir``; every process learns whether it got it."""
        error = None
        if self._lock is not None:
            try:
                self._lock.acquire()
            except RunLockedError as exc:
                error = exc
        if self.ctx.enabled and self.cfg.out_dir is not None:
            refused = torch.tensor([0 if error is None else 1], device=self.device)
            if int(distributed.all_reduce_sum(refused, self.ctx)) and error is None:
                error = RunLockedError(f"{self.cfg.out_dir} is in use by another run (the main process was refused "
                                       f"its lock)")
        if error is not None:
            raise error

    def release(self) -> None:
        """Gives up the run directory (done at the end of :meth:`fit`; the OS does it on a crash)."""
        if self._lock is not None:
            self._lock.release()

    def _setup(self, sae, resume) -> None:
        cfg = self.cfg
        self.step = 0
        state = None
        self.last_checkpoint = None
        if resume is not None:
            self.sae, state = self._restore(resume)
        elif sae is not None:
            self.sae = sae.to(self.device)
        else:       # under latent parallelism this process builds only its slice
            head = self._finite(self.source.head(32768)) if cfg.normalize_inputs or cfg.init_b_dec else None
            scale = input_scale_for(head) if cfg.normalize_inputs else None
            torch.manual_seed(cfg.seed)
            self.sae = cfg.build_sae(self.source.d, input_scale=scale, device=self.device,
                                     latent_group=self.ctx.latent_group)
            if cfg.init_b_dec:
                self.sae.init_b_dec_(head.to(self.device, self.sae.W_enc.dtype))
        if self.ctx.latent_size > 1 and not isinstance(self.sae, ShardedTopKSAE):      # a whole SAE given
            self.sae = ShardedTopKSAE.from_full(self.sae, group=self.ctx.latent_group)
        if self.sae.d_in != self.source.d:
            raise ValueError(f"the activation data has width {self.source.d} but the SAE expects "
                             f"d_in={self.sae.d_in}")
        # batches are read, shuffled, checked and copied to the device ahead of the step
        self.loader = PrefetchingLoader(
            ActivationLoader(self.source, cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                             memory_budget_mb=cfg.memory_budget_mb, rank=self.ctx.data_rank,
                             world_size=self.ctx.data_size, skip_nonfinite=cfg.skip_nonfinite),
            self.device, self.sae.W_enc.dtype)
        # fused Adam (CPU and CUDA) takes found_inf: a step with a non-finite loss is skipped on the
        # device, with no host synchronisation; the run stops at the next log step or checkpoint
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=cfg.betas, fused=True)
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        if self.device.type == "cuda" and isinstance(self.sae, BatchTopKSAE) and self.sae.max_k_per_row is None:
            warnings.warn("BatchTopK packs each row to the exact width, one host synchronisation a step on a GPU; "
                          "set max_k_per_row (--max-k-per-row) to a fixed width to avoid it", RuntimeWarning)
        # the loader checks every row on the host (check_finite_rows), so the module's own finite
        # check, a host synchronisation per step on a GPU, is not needed here
        self.sae.check_finite = False
        if state is not None:
            self.optimizer.load_state_dict(self._optimizer_state_for_my_rows(state))
            self.loader.load_state_dict(state["data"])
            self.step = int(state["step"])
            _set_rng_state(state["rng"], self.device)
        self.autocast = cfg.autocast and self.device.type == "cuda"
        self.checkpoint_step = self.step if resume is not None else None
        fresh = resume is None or run_dir_of(resume) is None
        found = _run_contents(cfg.out_dir) if fresh and cfg.out_dir is not None else []
        if found:
            advice = (f"resume it (--resume {cfg.out_dir})" if "checkpoints" in found
                      else "it has no checkpoint to resume: remove its files")
            raise FileExistsError(f"{cfg.out_dir} already holds a run ({', '.join(found)}); {advice} or choose "
                                  f"another out_dir")
        self.metrics = {}
        self._log = None
        if cfg.out_dir is not None and self.ctx.is_main:
            out = Path(cfg.out_dir)
            self._log = MetricsLog(out / METRICS_FILE, out / "tensorboard" if cfg.tensorboard else None,
                                   truncate_after=self.step if resume is not None else 0)

    def _finite(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (the first rows of the data) without NaN/Inf rows, or an error naming them."""
        if self.cfg.skip_nonfinite:
            return rows[torch.isfinite(rows).all(dim=1)]
        check_finite_rows(self.source, 0, rows, hint="; fix the data, or drop such rows with skip_nonfinite "
                                                     "(--skip-nonfinite)")
        return rows

    def _last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
                else "no checkpoint was written yet")

    # ------------------------------------------------------------------ resume
    def _restore(self, resume):
        # latent parallelism: each process reads only its rows, of a whole or a sharded checkpoint
        load_sae = ((lambda path: ShardedTopKSAE.load(path, self.ctx.latent_group, self.device))
                    if self.ctx.latent_size > 1 else (lambda path: load(path, device=self.device)))
        ckpt = read_checkpoint(resume, load_sae=load_sae, verify=self._verify_together if self.ctx.enabled else
                               verify_checkpoint)
        sae, saved_cfg, state = ckpt.sae, ckpt.train_config, ckpt.state
        self.last_checkpoint = ckpt.path
        resume = ckpt.path
        try:
            saved = TrainConfig.from_dict(saved_cfg, source=f"checkpoint {resume}")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint {resume} was written with an incompatible configuration: {exc}") from exc
        diff = saved.mismatches(self.cfg)
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume from {resume}: it was trained with another configuration ({lines})")
        if state.get("world_size", 1) != self.ctx.data_size:    # the data replicas (the latent shards may change)
            raise ValueError(f"cannot resume from {resume}: it was written by {state.get('world_size', 1)} "
                             f"data-parallel process(es), this run has {self.ctx.data_size}")
        if int(state["step"]) > self.cfg.steps:
            raise ValueError(f"checkpoint {resume} is at step {state['step']}, past steps={self.cfg.steps}")
        return sae, state

    def _verify_together(self, ckpt) -> str | None:
        """:func:`verify_checkpoint` by every process at once, each hashing its share of the files;
        one answer for all (so every process resumes from the same checkpoint)."""
        problems = [None] * self.ctx.world_size
        torch.distributed.all_gather_object(problems, verify_checkpoint(ckpt, share=(self.ctx.rank,
                                                                                   self.ctx.world_size)))
        return next((p for p in problems if p is not None), None)

    def state_dict(self) -> dict:
        """What a checkpoint holds besides the SAE. Under latent parallelism the per-latent
        optimizer moments are left out (each process writes its rows to an optimizer shard, see
        :mod:`sparse_sae.training.checkpoint`) and ``"optimizer_shards"`` says where they are."""
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "data": self.loader.state_dict(),
                 "rng": _rng_state(self.device), "world_size": self.ctx.data_size,
                 "latent_parallel": self.ctx.latent_size}
        if isinstance(self.sae, ShardedTopKSAE):
            sliced = self._sliced_parameter_indices()
            optimizer = state["optimizer"]
            # new dicts: optimizer.state_dict() hands out the live per-parameter state
            optimizer["state"] = {i: ({k: v for k, v in per_param.items() if i not in sliced or v.dim() == 0})
                                  for i, per_param in optimizer["state"].items()}
            sae = self.sae
            state["optimizer_shards"] = {"count": sae.n_shards,
                                         "bounds": [shard_bounds(sae.n_latents, sae.n_shards, r)
                                                    for r in range(sae.n_shards)]}
        return state

    def _sliced_parameter_indices(self) -> dict:
        """``{optimizer index: name}`` of the per-latent parameters."""
        return {i: name for i, (name, _) in enumerate(self.sae.named_parameters()) if name in SLICED}

    def _optimizer_shard(self) -> dict:
        """This process's rows of the per-latent optimizer moments, ``{"W_dec.exp_avg": ...}``."""
        names = self._sliced_parameter_indices()
        return {f"{names[i]}.{k}": v for i, per_param in self.optimizer.state_dict()["state"].items()
                if i in names for k, v in per_param.items() if v.dim() > 0}

    def _optimizer_state_for_my_rows(self, state: dict) -> dict:
        """The optimizer state of ``state`` (a checkpoint's) for this process's parameters: its
        slice of the per-latent moments under latent parallelism, from a whole checkpoint or from
        the optimizer shards of a sharded one (any number of them)."""
        optimizer, shards = state["optimizer"], state.get("optimizer_shards")
        sharded = isinstance(self.sae, ShardedTopKSAE)
        if shards is None and not sharded:
            return optimizer
        rows = (self.sae.lo, self.sae.hi) if sharded else (0, self.sae.n_latents)
        names = self._sliced_parameter_indices()
        if shards is not None:
            moments = read_optimizer_rows(self.last_checkpoint, shards, rows)
            for key, rows_of in moments.items():
                name, stat = key.rsplit(".", 1)
                index = next(i for i, n in names.items() if n == name)
                optimizer["state"].setdefault(index, {})[stat] = rows_of
        else:     # a whole checkpoint: cut this process's rows
            lo, hi = rows
            optimizer["state"] = {i: ({k: v if v.dim() == 0 else v[lo:hi].clone() for k, v in per_param.items()}
                                      if int(i) in names else per_param) for i, per_param in optimizer["state"].items()}
        return optimizer

    def whole_sae(self):
        """The whole SAE: ``self.sae``, or under latent parallelism its slices gathered (a collective;
        the whole SAE must then fit one device; checkpoints and ``final/`` are written by shard)."""
        return self.sae.to_full() if isinstance(self.sae, ShardedTopKSAE) else self.sae

    def _save_sharded(self, write_shard) -> None:
        """``write_shard()`` on the processes of data replica 0 (each holds one slice), a collective
        over every process: a failure anywhere raises everywhere."""
        run_on_every_rank(lambda: write_shard() if self.ctx.data_rank == 0 else None)

    def save_checkpoint(self) -> Path | None:
        """Writes a checkpoint of the current step (the main process; under latent parallelism every
        process of data replica 0 writes its shard of the SAE and of the optimizer state)."""
        if self.cfg.out_dir is None:
            return None
        self.check_finite_steps()   # never checkpoint past a skipped, non-finite step
        out, step, keep = self.cfg.out_dir, self.step, self.cfg.keep_checkpoints
        if not isinstance(self.sae, ShardedTopKSAE):
            if self.ctx.is_main:
                self.last_checkpoint = save_checkpoint(out, step, self.sae, self.cfg.to_dict(), self.state_dict(),
                                                       keep=keep)
        else:
            tmp = checkpoint_tmp_dir(out, step)
            run_on_every_rank(lambda: begin_checkpoint(out, step) if self.ctx.is_main else None)
            try:
                def write_shard():
                    self.sae.save(tmp, fold_input_scale=False)
                    write_optimizer_shard(tmp, self.sae.shard, self.sae.n_shards, self._optimizer_shard())
                self._save_sharded(write_shard)
            except BaseException:
                if self.ctx.is_main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
            path = run_on_every_rank(lambda: commit_checkpoint(out, step, tmp, self.cfg.to_dict(), self.state_dict(),
                                                               keep) if self.ctx.is_main else None)
            if self.ctx.is_main:
                self.last_checkpoint = path
        self.checkpoint_step = self.step
        distributed.barrier(self.ctx)
        return self.last_checkpoint

    # ------------------------------------------------------------------ one step
    def _loss(self, x, out, penalty_scale: float):
        """The SAE's loss with this step's penalty warm-up. Under data parallelism the local FVU,
        and AuxK's (normalised by the residual's variance), are rescaled so that averaging the
        gradients over the processes gives the global batch's."""
        sae, recon_scale, auxk_scale = self.sae, 1.0, 1.0
        if self.ctx.data_size > 1 and sae.recon_loss == "fvu":
            xs = x * sae.input_scale if sae.input_scale is not None else x
            recon_scale = self._share_of_global_variance(xs).to(out.losses["recon"].dtype)
        if self.ctx.data_size > 1 and "auxk" in out.losses:
            auxk_scale = self._share_of_global_variance(x - out.recon).to(out.losses["auxk"].dtype)
        return sae.loss(out, penalty_scale=penalty_scale, recon_scale=recon_scale, auxk_scale=auxk_scale)

    def _share_of_global_variance(self, rows: torch.Tensor) -> torch.Tensor:
        """``data_size *`` this replica's ``sum ||row - mean||^2`` over the global batch's (float64):
        the factor that turns a local variance-normalised loss into its share of the global one."""
        rows = rows.detach().to(torch.float64)
        local = (rows - rows.mean(0)).square().sum()
        return local / distributed.global_variance(rows, self.ctx) * self.ctx.data_size

    def check_finite_steps(self) -> None:
        """Stops the run if a step since the last check had a non-finite loss (its update was
        skipped). One host synchronisation: called on log steps, before a checkpoint and at the end."""
        bad = int(self._first_nonfinite)
        if bad >= 0:
            raise NonFiniteLossError(f"non-finite loss at step {bad}; training stopped, {self._last_good()}. Try a "
                                     f"lower lr (now {self.cfg.lr}) or check the data.")

    def train_step(self, x: torch.Tensor) -> dict:
        """One optimizer step on this process's rows ``x``; returns the step's loss terms."""
        sae, cfg, step = self.sae, self.cfg, self.step
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        before = sae.tokens_since_fired.clone() if self.ctx.data_size > 1 else None
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        # the paper's batch-active set A over the global batch, not this replica's rows
        global_a = (ops.reduce_batch_active(functools.partial(distributed.union_over_data, ctx=self.ctx))
                    if self.ctx.data_size > 1 else contextlib.nullcontext())
        # and BatchTopK's selection over the global batch (whole or sharded SAEs)
        global_cut = (ops.reduce_batch_selection(functools.partial(distributed.global_batch_cut, ctx=self.ctx),
                                                 functools.partial(distributed.min_over_data, ctx=self.ctx))
                      if self.ctx.data_size > 1 else contextlib.nullcontext())
        with autocast, global_a, global_cut:
            out = sae(x)
            loss = self._loss(x, out, penalty_scale_at(step, cfg))
        if before is not None:   # dead-latent counters over the global batch
            fired = distributed.all_reduce_sum(out.fired.detach().clone(), self.ctx, over_data=True)
            sae.tokens_since_fired.copy_(torch.where(fired > 0, 0, before + cfg.batch_size))
        finite = torch.isfinite(loss.detach())
        if self.ctx.enabled:
            finite = distributed.all_reduce_sum(finite.to(torch.int32), self.ctx) == self.ctx.world_size
        # no host sync: the first bad step is remembered on the device, its update skipped
        self._first_nonfinite = torch.where(finite | (self._first_nonfinite >= 0), self._first_nonfinite, step + 1)
        self.optimizer.found_inf = (~finite).to(torch.float32)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_gradients(sae.parameters(), self.ctx)
        sae.remove_parallel_grad_()
        if cfg.grad_clip:
            sae.clip_grad_norm_(cfg.grad_clip)
        self.optimizer.step()
        sae.normalize_decoder_()
        self.step += 1
        return {"out": out, "loss": loss}

    def _record(self, result, rows_per_s: float) -> dict:
        out, sae = result["out"], self.sae
        rec = {"step": self.step, "loss": float(result["loss"].detach()),
               "fvu": float(out.losses["recon"].detach()),
               "l0": float(out.l0()),
               "dead": float(sae.dead_mask(self.cfg.dead_after_tokens).float().mean()),
               "lr": self.optimizer.param_groups[0]["lr"], "rows_per_s": rows_per_s}
        if self.cfg.skip_nonfinite:
            rec["skipped_rows"] = self.loader.skipped_rows
        for name, value in out.losses.items():
            if name != "recon":
                rec[name] = float(value.detach())
        return rec

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Trains until ``cfg.steps``; checkpoints every ``checkpoint_every`` steps and at the end, and
        saves the final SAE (input scale folded in) to ``<out_dir>/final``. Returns the last metrics
        with the throughput in rows per second."""
        cfg, sae = self.cfg, self.sae
        self._take_run_dir()         # again, if a previous fit() gave it up
        sae.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.desc, dynamic_ncols=True, leave=False,
                   disable=not (cfg.progress and self.ctx.is_main))
        rows, start = 0, time.perf_counter()
        flush = self.device.type == "cpu" and cfg.flush_denormal
        if flush:
            torch.set_flush_denormal(True)
        try:
            while self.step < cfg.steps:
                try:
                    x = self.loader.next_batch()
                except NonFiniteDataError as exc:
                    raise NonFiniteDataError(f"{exc}. Training stopped while reading the batch of step "
                                             f"{self.step + 1}; {self._last_good()}") from None
                result = self.train_step(x)
                rows += x.shape[0] * self.ctx.data_size
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.check_finite_steps()
                    elapsed = time.perf_counter() - start
                    self.metrics = self._record(result, rows / elapsed if elapsed > 0 else math.inf)
                    bar.set_postfix({k: f"{self.metrics[k]:.3g}" for k in ("loss", "fvu", "l0", "dead")})
                    if self._log is not None:
                        self._log.write(self.metrics)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self)
            if cfg.out_dir is not None:
                if self.checkpoint_step != self.step:
                    self.save_checkpoint()
                final = Path(cfg.out_dir) / FINAL_DIR
                if isinstance(self.sae, ShardedTopKSAE):
                    self._save_sharded(lambda: self.sae.save(final, activations=self.activations))
                elif self.ctx.is_main:
                    self.sae.save(final, activations=self.activations)
        finally:
            self.loader.close()
            if flush:
                torch.set_flush_denormal(False)
            bar.close()
            if self._log is not None:
                self._log.close()
                self._log = None
            self.release()
        elapsed = time.perf_counter() - start
        self.metrics["rows_per_s"] = rows / elapsed if elapsed > 0 else math.inf
        return self.metrics
