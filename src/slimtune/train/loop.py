"""The training loop: read it top to bottom.

    train(config)
      1. set up: processes, seeds, model (4-bit base + LoRA; sharded with --fsdp), data,
         optimizer, resume
      2. for every optimizer step:
           learning rate of this step
           micro-batches -> this rank's rows -> sum of token losses / global token count
           backward; sum gradients across ranks; NaN guard; clip; optimizer step
           log; evaluate every `eval_every` steps and at each epoch end; checkpoint
      3. final evaluation, adapter in PEFT format, config.yaml, loss.png

Everything a step does is a function of its step number and the checkpointed state, which is
why a resumed run ends with exactly the adapter of a run that never stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.data import Collator
from slimtune.devices import to_device
from slimtune.dist import (
    LoadedPart,
    all_reduce_gradients,
    all_reduce_sum,
    full_optimizer_state,
    full_trainable,
    init_distributed,
    shard_batch,
    shard_model,
    shard_optimizer_state,
    shutdown_distributed,
    whole,
)
from slimtune.errors import SlimtuneError
from slimtune.lora import fuse_shared_inputs, set_sparse_dropout
from slimtune.models.attention import use_native_attention
from slimtune.models.lean_mlp import use_lean_mlp
from slimtune.optim import build_optimizer
from slimtune.tokens import IGNORE_INDEX
from slimtune.train.batching import StepPlan
from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from slimtune.train.config import TrainConfig
from slimtune.train.evaluate import EvalResult, evaluate
from slimtune.train.forward import count_trained_tokens, summed_loss
from slimtune.train.metrics import MetricsLog, plot_losses
from slimtune.train.precision import (
    cast_frozen,
    describe_compute_dtype,
    dtype_name,
    float32_compute,
    training_dtype,
)
from slimtune.train.preference import PreferenceObjective, evaluate_pairs, preference_backward
from slimtune.train.schedule import lr_at, warmup_steps
from slimtune.train.setup import TrainData, build_data, build_model, save_final


class TrainingDiverged(SlimtuneError):
    """The loss or the gradients became NaN or infinite."""


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    evals: list[dict[str, Any]]
    model: nn.Module = field(repr=False)
    tokenizer: Any = field(repr=False, default=None)
    is_main: bool = True  # False on the other ranks of a torchrun job: they report nothing


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    data: TrainData | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train as `config` says. `model`/`tokenizer`/`data` may be given ready-made (a library
    caller, a test); otherwise they come from `config.model` and `config.data`."""
    # --- 1. set up --------------------------------------------------------------------
    info = init_distributed()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    output = Path(config.output)
    if info.is_main:
        output.mkdir(parents=True, exist_ok=True)

    if data is None and config.data is None:  # before the (slow) model load
        raise SlimtuneError("no training data: give `data:` in the config or --data FILE")
    # --fsdp under torchrun: each rank keeps 1/N of the base (from loading on), the adapter, its
    # gradients and its optimizer state.
    sharded = config.fsdp and info.is_distributed
    if model is None:
        keep_part = LoadedPart(info.rank, info.world_size) if sharded else None
        model, tokenizer = build_model(config, keep_part)
    if data is None:
        data = build_data(config, tokenizer, info)
    if not data.train:
        raise SlimtuneError(f"no training rows in {config.data}")
    model.to(info.device)  # this rank's GPU under torchrun with CUDA; a no-op on the CPU
    compute_dtype = training_dtype(config.compute_dtype, config.method, info.device)
    cast_frozen(model, compute_dtype)  # the frozen base multiplies in it, the rest in float32
    if info.is_main:
        print(describe_compute_dtype(config.compute_dtype, compute_dtype, info.device), flush=True)
    model.train()
    if config.lean_mlp:
        use_lean_mlp(model, native=True)  # half the MLP activations; SwiGLU in C
    if config.native_attention and info.device.type == "cpu":
        use_native_attention(model)  # same attention, float32 sums, faster than SDPA's
    set_sparse_dropout(model, config.sparse_dropout)
    fuse_shared_inputs(model)  # one A product for q/k/v and for gate/up: same values
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Sharded: `step_loss` is the FSDP root, which gathers layer by layer.
    step_loss = shard_model(model, summed_loss, info) if sharded else partial(summed_loss, model)

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SlimtuneError("the model has no trainable parameters (no adapter injected?)")
    optimizer = build_optimizer(
        config.optimizer, trainable, lr=config.lr, weight_decay=config.weight_decay
    )
    collate = Collator(data.pad_token_id)
    preference = PreferenceObjective.from_config(config)  # None: supervised fine-tuning

    plan = StepPlan(
        n_rows=len(data.train),
        rows_per_micro=config.batch_size * info.world_size,
        grad_accum=config.grad_accum,
        epochs=config.epochs,
        seed=config.seed,
        max_steps=config.max_steps,
        drop_last=info.is_distributed,
    )
    total = plan.total_steps
    if total == 0:
        raise SlimtuneError(
            f"{len(data.train)} training rows make no full batch of "
            f"{plan.rows_per_micro} rows across {info.world_size} processes"
        )
    warmup = warmup_steps(total, config.warmup_ratio, config.warmup_steps)
    metrics = MetricsLog(output / "metrics.jsonl", enabled=info.is_main)
    checkpoints = output / "checkpoints"

    start = 0
    if config.resume:
        with full_trainable(model):  # sharded: every rank reads the whole tensors, keeps its own
            start = _resume(config, checkpoints, model, optimizer, metrics)
        shard_optimizer_state(optimizer)
    elif info.is_main and metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh log
    if info.is_main:
        (output / "config.yaml").write_text(config.to_yaml())

    # --- 2. the steps ------------------------------------------------------------------
    bar = _progress_bar(total, start, enabled=progress and info.is_main)
    bar.write(_describe_plan(plan, len(data.train)))
    evals: list[dict[str, Any]] = [r for r in metrics.records if "eval_loss" in r]
    loss_value = float("nan")
    for step in range(start, total):
        epoch = plan.epoch_of(step)
        lr = lr_at(
            step, base_lr=config.lr, total_steps=total, warmup=warmup, schedule=config.lr_scheduler
        )
        for group in optimizer.param_groups:
            group["lr"] = lr

        t0 = time.perf_counter()
        # Dropout draws of this step on this rank: a function of (seed, step, rank) alone, so
        # a resumed run (on any number of processes) draws what an unbroken one drew.
        torch.manual_seed(_step_seed(config.seed, step, info.rank))
        shards = [
            shard_batch([data.train[i] for i in rows], info) for rows in plan.micro_batches(step)
        ]
        if preference is not None:  # DPO / ORPO: rows are pairs, losses are per pair
            loss_sum, pair_stats = preference_backward(
                model, shards, preference, info, data.pad_token_id
            )
        else:
            batches = [to_device(collate(shard), info.device) for shard in shards]
            # Normalise by the trained tokens of the whole step on all ranks: every token weighs
            # the same, however the rows fall into micro-batches and processes.
            global_tokens = all_reduce_sum(sum(count_trained_tokens(b) for b in batches), info)
            loss_sum = torch.zeros((), device=info.device)
            for batch in batches:
                loss = step_loss(batch) / max(global_tokens, 1)
                loss.backward()
                loss_sum += loss.detach()
        if not sharded:  # FSDP's reduce-scatter has summed them in backward
            all_reduce_gradients(trainable, info)
        loss_value = float(all_reduce_sum(loss_sum, info))

        grad_norm = _grad_norm(trainable, config.max_grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            _diverged(step, epoch, loss_value, grad_norm, checkpoints, bar)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0

        input_tokens = all_reduce_sum(sum(_row_tokens(e) for s in shards for e in s), info)
        record = dict(
            step=step + 1,
            epoch=epoch + (step % plan.steps_per_epoch + 1) / plan.steps_per_epoch,
            loss=loss_value,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=input_tokens / elapsed,
            compute_dtype=dtype_name(compute_dtype),
        )
        if preference is not None:
            record.update(pair_stats.means())
        if info.is_main and (step + 1) % config.log_every == 0:
            metrics.log(record)
        _update_bar(bar, record)

        done = step + 1 == total
        eval_due = _due(step, config.eval_every) or plan.is_epoch_end(step) or done
        if eval_due and info.is_main and preference is not None and data.eval:
            scores = evaluate_pairs(
                model,
                data.eval,
                preference,
                pad_token_id=data.pad_token_id,
                batch_size=config.batch_size,
            )
            evals.append(dict(step=step + 1, epoch=record["epoch"], **scores))
            metrics.log(evals[-1])
            bar.write(_describe_eval(evals[-1]))
        elif eval_due and sharded and data.eval:  # every rank: each forward gathers from all
            result = _evaluate_sharded(step_loss, model, data, config, info)
            if info.is_main:
                evals.append(_eval_record(step + 1, record["epoch"], result))
                metrics.log(evals[-1])
                bar.write(_describe_eval(evals[-1]))
        elif eval_due and info.is_main and (data.eval or data.eval_pairs):
            result = _evaluate(model, tokenizer, data, config)
            evals.append(_eval_record(step + 1, record["epoch"], result))
            metrics.log(evals[-1])
            bar.write(_describe_eval(evals[-1]))
        if _due(step, config.save_every) or done:
            trainer_state = dict(epoch=epoch, total_steps=total, lr=lr, seed=config.seed)
            with full_trainable(model):  # sharded: gathered on every rank, rank 0 writes
                optimizer_state = full_optimizer_state(optimizer)
                if info.is_main:
                    save_checkpoint(
                        checkpoints,
                        step + 1,
                        model,
                        optimizer_state,
                        trainer_state,
                        config.keep_checkpoints,
                    )
    bar.close()
    # The returned model computes in float32 again, as every caller (evaluation, generation)
    # expects; the adapter was float32 throughout.
    cast_frozen(model, torch.float32)

    # --- 3. the results ----------------------------------------------------------------
    with full_trainable(model):
        if info.is_main:
            save_final(model, tokenizer, config, output)
    if info.is_main:
        plot_losses(metrics.records, output / "loss.png")
    shutdown_distributed(info)
    return TrainResult(output, total, loss_value, evals, model, tokenizer, info.is_main)


# ------------------------------------------------------------------------------- helpers


def _resume(config, checkpoints: Path, model, optimizer, metrics: MetricsLog) -> int:
    path = latest_checkpoint(checkpoints) if config.resume is True else Path(config.resume)
    if path is None:
        raise SlimtuneError(f"--resume: no checkpoint in {checkpoints}")
    state = load_checkpoint(path, model, optimizer)
    metrics.truncate_after(state["step"])
    return int(state["step"])


def _grad_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """The total gradient norm, clipping to `max_norm` when given."""
    limit = max_norm if max_norm is not None else float("inf")
    return float(whole(torch.nn.utils.clip_grad_norm_(params, limit)))  # sharded: a DTensor


def _step_seed(seed: int, step: int, rank: int) -> int:
    """A seed per (run seed, step, rank), spread over 63 bits (torch.manual_seed's range)."""
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank) % (2**63 - 1)


def _diverged(step, epoch, loss, grad_norm, checkpoints: Path, bar) -> None:
    bar.close()
    last = latest_checkpoint(checkpoints)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise TrainingDiverged(
        f"training diverged at step {step + 1} (epoch {epoch + 1}): loss {loss}, gradient norm "
        f"{grad_norm}; stopped before the optimizer step, {kept}. Try a lower --lr, "
        "--max-grad-norm, or check the data"
    )


def _due(step: int, every: int | None) -> bool:
    return bool(every) and (step + 1) % every == 0


def _evaluate(model, tokenizer, data: TrainData, config: TrainConfig) -> EvalResult:
    pairs = data.eval_pairs[: config.eval_max_rows] if config.eval_max_rows else data.eval_pairs
    with float32_compute(model):  # evaluation decodes 4-bit layers into float32 copies
        return evaluate(
            model,
            tokenizer,
            examples=data.eval,
            pairs=pairs,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=data.pad_token_id,
        )


@torch.no_grad()
def _evaluate_sharded(
    root: nn.Module, model: nn.Module, data: TrainData, config: TrainConfig, info
) -> EvalResult:
    """The eval loss with the model sharded (--fsdp), on every rank. Each forward pass gathers
    layers from all ranks, so all run the same passes, each on its share of every batch of
    `batch_size` x N rows; a rank with no row in the last batch runs one whose tokens all count
    for nothing. No answers are generated (generation calls the model, not the root that
    gathers the output layer): the exact match is not measured."""
    collate = Collator(data.pad_token_id)
    rows_per_pass = config.batch_size * info.world_size
    total, count = 0.0, 0
    model.eval()  # no dropout
    with float32_compute(model):  # as the unsharded evaluation scores
        for start in range(0, len(data.eval), rows_per_pass):
            rows = shard_batch(data.eval[start : start + rows_per_pass], info)
            batch = to_device(collate(rows or [_counting_nothing(data.eval[start])]), info.device)
            total += float(root(batch))
            count += count_trained_tokens(batch)
    model.train()
    loss = all_reduce_sum(total, info) / max(all_reduce_sum(count, info), 1)
    return EvalResult(loss, math.exp(min(loss, 80.0)), None, len(data.eval))


def _counting_nothing(row: dict) -> dict:
    return {**row, "labels": [IGNORE_INDEX] * len(row["labels"])}


def _eval_record(step: int, epoch: float, result: EvalResult) -> dict[str, Any]:
    return dict(
        step=step,
        epoch=epoch,
        eval_loss=result.loss,
        eval_perplexity=result.perplexity,
        eval_accuracy=result.exact_match,
    )


# Below this many optimizer steps a run rarely learns a task; the user hears it before training.
FEW_OPTIMIZER_STEPS = 30


def _describe_plan(plan: StepPlan, n_rows: int) -> str:
    rows_per_step = plan.rows_per_micro * plan.grad_accum
    text = (
        f"{plan.total_steps} optimizer steps: {n_rows} rows x {plan.epochs} epoch(s), "
        f"{rows_per_step} rows a step ({plan.rows_per_micro} a micro-batch x grad_accum "
        f"{plan.grad_accum})"
    )
    chosen = plan.max_steps is not None and plan.max_steps == plan.total_steps
    if chosen:
        text += f", stopping at --max-steps {plan.max_steps}"
    elif plan.total_steps < FEW_OPTIMIZER_STEPS:
        text += (
            f". Warning: only {plan.total_steps} optimizer steps, too few for most tasks to be "
            "learnt; a smaller --batch-size or --grad-accum, or more --epochs, gives more"
        )
    return text


def _row_tokens(row: dict) -> int:
    """Input tokens of a row; a preference pair counts both of its answers' rows."""
    if "input_ids" in row:
        return len(row["input_ids"])
    return len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])


def _describe_eval(record: dict[str, Any]) -> str:
    text = f"eval @ step {record['step']}: loss {record['eval_loss']:.4f}"
    if "eval_reward_accuracy" in record:  # preference tuning
        text += f", preference accuracy {100 * record['eval_reward_accuracy']:.1f}%"
        return text + f", reward margin {record['eval_reward_margin']:.3f}"
    text += f", perplexity {record['eval_perplexity']:.2f}"
    if record["eval_accuracy"] is not None:
        text += f", exact match {100 * record['eval_accuracy']:.1f}%"
    return text


class _NoBar:
    def update(self, n=1): ...
    def set_postfix(self, *a, **k): ...
    def write(self, text): ...
    def close(self): ...


def _progress_bar(total: int, start: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)


def _update_bar(bar, record: dict[str, Any]) -> None:
    bar.set_postfix(
        loss=f"{record['loss']:.4f}",
        tok_s=f"{record['tokens_per_s']:.0f}",
        lr=f"{record['lr']:.2e}",
        refresh=False,  # update() below redraws once
    )
    bar.update(1)
