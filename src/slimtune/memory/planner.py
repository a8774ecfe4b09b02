"""Predict the peak memory of a training run, part by part, before running it.

    total = runtime + tokenizer + weights + quantization constants + LoRA weights
            + gradients + optimizer state + activations

The run is a TrainConfig (the settings `slimtune train` reads) and the device it runs on.
Every part but two is exact arithmetic over the architecture's shapes. `activations` comes
from a model of what autograd keeps for the backward pass of a LLaMA block (activations.py),
calibrated against peak RSS measured on CPU (benchmarks/bench_memory.py). `runtime` is the
framework itself: Python, torch and transformers in the process (measured on CPU), or a CUDA
context on a GPU (an assumption, not measured here). `tokenizer` is what the run's tokenizer
takes in host memory, which the caller measures (`slimtune estimate` loads it): it is no
function of the shapes (a few hundred MiB for a vocabulary of 100-250k words).

What the trainer keeps in which dtype (slimtune.train.precision): adapters, their gradients and
optimizer state, the residual stream and every weight that is neither quantized nor under an
adapter are float32; the compute dtype stores the frozen bases under LoRA (method lora), the
4-bit layers' decoded weight, and a cast copy of the frozen output layer.

With `fsdp` over N processes the estimate is per process (`per_process`): 1/N of the weights,
constants, adapter, gradients and optimizer state, plus what is gathered whole at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from slimtune.choices import AUTO, COMPUTE_DTYPES
from slimtune.errors import SlimtuneError
from slimtune.memory.activations import activation_bytes
from slimtune.memory.architecture import Architecture, adapter_ranks
from slimtune.memory.batch import BatchShape, RowSizes, full_rows
from slimtune.memory.units import DTYPE_BYTES

if TYPE_CHECKING:  # the planner reads a config's fields; it needs nothing else of train/
    from slimtune.train.config import TrainConfig

PARTS = (
    "runtime",
    "tokenizer",
    "weights",
    "quant_constants",
    "lora_weights",
    "gradients",
    "optimizer_state",
    "activations",
)
# The TrainConfig keys that decide a run's memory: what an estimate reports as its settings.
PLAN_KEYS = (
    "method", "objective", "rank", "rank_pattern", "targets", "use_dora", "init", "dropout",
    "batch_size", "max_length", "gradient_checkpointing", "optimizer", "compute_dtype",
    "quant_type", "blocksize", "double_quant", "lean_mlp", "sparse_dropout", "fsdp",
)  # fmt: skip
# RSS of a process that imported torch, transformers and slimtune and ran a first step on a
# CPU, model excluded (fitted with benchmarks/bench_memory.py's tiny case; see
# benchmarks/reports/memory.md). On a GPU: the CUDA context and allocator slack, an assumed 1 GiB.
RUNTIME_BYTES = {"cpu": 380 * 2**20, "cuda": 2**30}
DEVICES = tuple(RUNTIME_BYTES)
# On a CPU numba's compiler comes too, for the 4-bit decode kernel (slimtune.quant.kernels) and,
# where the C kernels are off, for sparse LoRA dropout (slimtune.lora.sparse_dropout): measured
# 130 MiB of RSS on the tiny case, where the weights are negligible.
KERNEL_RUNTIME_BYTES = 130 * 2**20
# The planner's error against measured peak RSS on a CPU, out of sample: predicted / measured - 1
# over `benchmarks/bench_memory.py --validate`, runs whose ranks, batches, lengths and optimizers
# were not used to fit the constants (table in benchmarks/reports/memory.md; `bench_memory.py
# --repredict` recomputes it from the recorded peaks). No device but the CPU has been
# measured: on CUDA the estimate is the analytic count alone.
ERROR_BAND: dict[str, tuple[float, float]] = {"cpu": (-0.290, 0.044)}
FLOAT32 = DTYPE_BYTES["float32"]
# A page fault in a file mapping maps the neighbouring pages the page cache holds too (Linux's
# fault_around_bytes, 64 KiB by default): what one looked-up row of a memory-mapped embedding
# adds to RSS, at least.
FAULT_AROUND = 64 * 2**10


@dataclass
class MemoryEstimate:
    architecture: Architecture
    config: TrainConfig
    device: str
    compute_dtype: str  # what the frozen base computes in, `auto` resolved
    parts: dict[str, int]
    shape: BatchShape  # the micro-batch planned for
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def error_band(self) -> tuple[float, float] | None:
        """(lowest, highest) measured error of the planner on this device; None: uncalibrated."""
        return ERROR_BAND.get(self.device)

    def likely_range(self) -> tuple[int, int] | None:
        """The peak a run will likely measure, given the planner's measured error band."""
        if self.error_band is None:
            return None
        low, high = self.error_band
        return int(self.total / (1 + high)), int(self.total / (1 + low))

    def settings(self) -> dict:
        """The settings that decided this estimate, `compute_dtype` resolved, and the device."""
        out = {key: getattr(self.config, key) for key in PLAN_KEYS}
        return {**out, "compute_dtype": self.compute_dtype, "device": self.device}

    def to_dict(self) -> dict:
        out: dict = {f"{name}_bytes": value for name, value in self.parts.items()}
        out["total_bytes"] = self.total
        out["calibrated"] = self.error_band is not None
        if self.error_band is not None:
            out["error_band"] = list(self.error_band)
            out["likely_peak_range"] = list(self.likely_range())
        out["trainable_params"] = self.trainable_params
        out["total_params"] = self.architecture.num_params()
        out["model"] = self.architecture.name
        out["settings"] = self.settings()
        out["batch_shape"] = self.shape.to_dict()
        return out


def optimizer_state_bytes(tensor_sizes: list[int], optimizer: str) -> int:
    """Two Adam moments per parameter: 4 bytes each, or 1 byte + one float32 per 256 (8-bit,
    tensors of 4096 elements or more)."""
    total = 0
    for n in tensor_sizes:
        if optimizer.endswith("8bit") and n >= 4096:
            total += 2 * (n + 4 * -(-n // 256))
        else:
            total += 8 * n
    return total


def quantized_bytes(numel: int, config: TrainConfig) -> tuple[int, int]:
    """(packed 4-bit codes, quantization constants) of one weight of `numel` elements."""
    blocks = -(-numel // config.blocksize)
    # Double quantization: uint8 absmax codes, a float32 scale per 256 of them, the offset.
    constants = blocks + 4 * -(-blocks // 256) + 4 if config.double_quant else 4 * blocks
    return numel // 2 + numel % 2, constants


def planned_compute_dtype(config: TrainConfig, auto: str = "float32") -> str:
    """The dtype the run's frozen base computes in; `auto` is what compute_dtype auto means on
    the device (bfloat16 where it multiplies it natively). Full fine-tuning is float32."""
    if config.method == "full":
        return "float32"
    name = auto if config.compute_dtype == AUTO else config.compute_dtype
    if name not in COMPUTE_DTYPES:
        raise SlimtuneError(
            f"auto compute dtype: {name!r} is not one of {', '.join(COMPUTE_DTYPES)}"
        )
    return name


def _c_kernels() -> bool:
    from slimtune.quant import native  # torch comes with it: only when a plan needs it

    return native.enabled()


def estimate(
    arch: Architecture,
    config: TrainConfig,
    device: str = "cpu",
    auto_dtype: str = "float32",
    processes: int = 1,
    rows: RowSizes | None = None,
    tokenizer_bytes: int = 0,
) -> MemoryEstimate:
    """The memory a training step of `arch` under `config` needs at its peak on `device`
    ("cpu" or "cuda"); `auto_dtype`: what compute_dtype auto resolves to there. `processes`:
    how many torchrun starts; with `fsdp` the estimate is then that of each one. `rows`: the
    training rows the run will see, whose largest batch is planned for; without them,
    `batch_size` rows filling `max_length`, every position trained. `tokenizer_bytes`: the
    host memory of the run's tokenizer, as measured where it was loaded."""
    if device not in DEVICES:
        raise SlimtuneError(f"device: {device!r} is not one of {', '.join(DEVICES)}")
    compute = planned_compute_dtype(config, auto_dtype)
    shape = rows.largest_batch(config) if rows is not None else full_rows(config)
    parts = dict.fromkeys(PARTS, 0)
    parts["runtime"] = RUNTIME_BYTES[device]
    parts["tokenizer"] = tokenizer_bytes
    sparse_dropout = config.method == "lora" and config.dropout > 0 and config.sparse_dropout
    uses_numba = config.method == "qlora" or (sparse_dropout and not _c_kernels())
    if uses_numba and device == "cpu":
        parts["runtime"] += KERNEL_RUNTIME_BYTES
    other = arch.num_params() - arch.num_layers * arch.block_linear_params()
    adapted = [] if config.method == "full" else adapter_ranks(
        arch, config.targets, config.rank, config.rank_pattern
    )  # fmt: skip
    parts["weights"], parts["quant_constants"] = _weight_bytes(arch, config, adapted, compute)
    if config.method == "full":
        trainable_sizes = [
            n_in * n_out for _, n_in, n_out in arch.block_linears()
        ] * arch.num_layers
        trainable_sizes += [other]  # embeddings, norms: their sizes only matter for 8-bit
        trainable = arch.num_params()
        parts["gradients"] = trainable * FLOAT32
    else:
        trainable_sizes = _adapter_sizes(adapted, config.use_dora)
        trainable = sum(trainable_sizes)
        parts["lora_weights"] = trainable * FLOAT32
        parts["gradients"] = trainable * FLOAT32
        if config.init == "pissa":  # the starting A and B, kept for the conversion on save
            parts["lora_weights"] += sum(_adapter_sizes(adapted, dora=False)) * FLOAT32
    parts["optimizer_state"] = optimizer_state_bytes(trainable_sizes, config.optimizer)
    parts["activations"] = activation_bytes(
        arch, config, adapted, device, DTYPE_BYTES[compute], shape
    )
    notes = _notes(arch, config, device)
    if config.fsdp and processes > 1:  # sharding copies every tensor: none stays mapped
        head_copy = _head_copy_bytes(arch, config, compute)
        parts = per_process(parts, arch, head_copy, processes)
        notes.append(
            f"fsdp: per process of {processes}; the base, adapter and optimizer state sharded, "
            "one decoder layer at a time and the output layer for the step gathered whole"
        )
    else:
        parts["weights"] -= _unread_embedding_bytes(arch, config, rows)
    return MemoryEstimate(arch, config, device, compute, parts, shape, trainable, notes)


def per_process(
    parts: dict[str, int], arch: Architecture, head_copy: int, processes: int
) -> dict[str, int]:
    """The parts of one of `processes` FSDP ranks. Each keeps 1/N of every sharded tensor and,
    while it computes, whole copies of the units being gathered: one decoder layer (its
    weights, constants, adapter and the adapter's gradients before the reduce-scatter) and
    the root unit (final norm and output layer, with the embeddings when tied to it), which
    stays whole for the step; untied embeddings are gathered for their forward only, before
    the activations grow. The compute-dtype copy of the output layer is made whole on each
    rank, and activations are those of the rank's own rows."""
    layers = arch.num_layers
    rest = (arch.num_params() - layers * arch.block_linear_params()) * FLOAT32
    embeddings = 0 if arch.tie_embeddings else arch.vocab_size * arch.hidden_size * FLOAT32
    layer = (parts["weights"] - head_copy - rest) // layers
    out = dict(parts)
    sharded = -(-(parts["weights"] - head_copy) // processes)
    out["weights"] = sharded + rest - embeddings + layer + head_copy
    for name in ("quant_constants", "lora_weights", "gradients"):
        out[name] = -(-parts[name] // processes) + parts[name] // layers
    out["optimizer_state"] = -(-parts["optimizer_state"] // processes)
    return out


def _weight_bytes(
    arch: Architecture, config: TrainConfig, adapted: list[tuple], compute: str
) -> tuple[int, int]:
    """(weights, quantization constants): 4-bit codes for QLoRA's block linears, the frozen
    bases under a LoRA adapter in the compute dtype, everything else float32."""
    constants = 0
    if config.method == "qlora":
        codes = 0
        for _, n_in, n_out in arch.block_linears():
            c, k = quantized_bytes(n_in * n_out, config)
            codes, constants = codes + c, constants + k
        codes, constants = codes * arch.num_layers, constants * arch.num_layers
        other = arch.num_params() - arch.num_layers * arch.block_linear_params()
        weights = codes + other * FLOAT32
    elif config.method == "lora":
        under = sum(n_in * n_out for _, n_in, n_out, _ in adapted) * arch.num_layers
        weights = under * DTYPE_BYTES[compute] + (arch.num_params() - under) * FLOAT32
    else:
        weights = arch.num_params() * FLOAT32
    return weights + _head_copy_bytes(arch, config, compute), constants


def _unread_embedding_bytes(arch: Architecture, config: TrainConfig, rows: RowSizes | None) -> int:
    """The part of the input embedding that never becomes resident: with QLoRA from a float32
    checkpoint it stays a memory map of the file, and a step reads only the rows its batches
    look up (about FAULT_AROUND each). A tied embedding is the output layer, read whole; without
    the data every row is assumed read."""
    streamed = config.method == "qlora" and config.init != "loftq"  # loftq loads in float
    if not (streamed and arch.float32_checkpoint) or arch.tie_embeddings or rows is None:
        return 0
    table = arch.vocab_size * arch.hidden_size * FLOAT32
    read = rows.distinct_tokens * max(arch.hidden_size * FLOAT32, FAULT_AROUND)
    return max(0, table - read)


def _head_copy_bytes(arch: Architecture, config: TrainConfig, compute: str) -> int:
    """The loss's copy of the frozen output layer in the compute dtype (none in float32)."""
    if config.method == "full" or compute == "float32":
        return 0
    return arch.vocab_size * arch.hidden_size * DTYPE_BYTES[compute]


def _notes(arch: Architecture, config: TrainConfig, device: str) -> list[str]:
    notes = []
    if config.optimizer.startswith("paged") and device == "cuda":
        notes.append("paged optimizer: its state lives in host RAM and is counted here anyway")
    if config.objective != "sft":
        # A preference step keeps one side's activations at a time (B rows of up to
        # max_length, as a supervised step of that batch); the other side's forward pass
        # without gradients and the cached reference log-probs add little
        # (benchmarks/bench_preference.py).
        notes.append(
            f"{config.objective}: batch_size pairs; one side's activations at a time, as sft"
        )
    if config.use_dora:
        notes.append("DoRA: its magnitudes counted; activations as plain LoRA's (not measured)")
    if config.init == "loftq":
        float_bytes = arch.num_params() * FLOAT32
        notes.append(f"init loftq: the base loads in float32 first ({float_bytes / 2**30:.1f} GiB)")
    return notes


def _adapter_sizes(adapted: list[tuple[str, int, int, list[int]]], dora: bool) -> list[int]:
    """Element counts of every adapter tensor: A and B per adapted layer, and DoRA's
    magnitude (one per output row; experts take no DoRA)."""
    sizes = []
    for name, n_in, n_out, ranks in adapted:
        for r in ranks:
            sizes += [r * n_in, r * n_out]
            if dora and not name.startswith("experts."):
                sizes.append(n_out)
    return sizes
