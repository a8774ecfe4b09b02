"""Predict the peak memory of a training run, part by part, before running it.

    total = runtime + weights + quantization constants + LoRA weights + gradients
            + optimizer state + activations

Every part but two is exact arithmetic over the architecture's shapes. `activations` comes
from a model of what autograd keeps for the backward pass of a LLaMA block (activations.py),
calibrated against peak RSS measured on CPU (benchmarks/bench_memory.py). `runtime` is the
framework itself: Python, torch and transformers in the process (measured on CPU), or a CUDA
context on a GPU (an assumption, not measured here).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from slimtune.choices import METHODS, OBJECTIVES, OPTIMIZERS
from slimtune.errors import SlimtuneError
from slimtune.memory.activations import activation_bytes
from slimtune.memory.architecture import Architecture

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
PARTS = (
    "runtime",
    "weights",
    "quant_constants",
    "lora_weights",
    "gradients",
    "optimizer_state",
    "activations",
)
# RSS of a process that imported torch, transformers and slimtune and ran a first step on
# this CPU, model excluded (fitted with benchmarks/bench_memory.py's tiny case; see
# docs/memory.md). On a GPU: the CUDA context and allocator slack, an assumed 1 GiB.
RUNTIME_BYTES = {"cpu": 380 * 2**20, "cuda": 2**30}
# On a CPU numba's compiler comes too, for the 4-bit decode kernel (slimtune.quant.kernels) and
# for sparse LoRA dropout (slimtune.lora.sparse_dropout): measured 130 MiB of RSS on the tiny
# case, where the weights are negligible.
KERNEL_RUNTIME_BYTES = 130 * 2**20
# The planner's error against measured peak RSS on a CPU, out of sample: predicted / measured - 1
# over `benchmarks/bench_memory.py --validate`, runs whose ranks, batches, lengths and optimizers
# were not used to fit the constants (table in benchmarks/reports/memory.md). No device but the
# CPU has been measured: on CUDA the estimate is the analytic count alone.
ERROR_BAND: dict[str, tuple[float, float]] = {"cpu": (-0.314, 0.036)}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PlanSettings:
    """The run's settings that decide its memory; names and defaults as in `slimtune train`."""

    method: str = "qlora"
    rank: int = 64
    targets: str | list[str] = "all-linear"
    batch_size: int = 4
    max_length: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    dropout: float = 0.05
    weight_dtype: str = "float32"  # the base weights that are not quantized
    adapter_dtype: str = "float32"  # LoRA weights and their gradients
    compute_dtype: str = "float32"  # activations
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    quantize_lm_head: bool = False
    device: str = "cpu"
    objective: str = "sft"  # dpo / orpo: batch_size counts pairs

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method, METHODS),
            ("objective", self.objective, OBJECTIVES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("device", self.device, tuple(RUNTIME_BYTES)),
            ("weight_dtype", self.weight_dtype, tuple(DTYPE_BYTES)),
            ("adapter_dtype", self.adapter_dtype, tuple(DTYPE_BYTES)),
            ("compute_dtype", self.compute_dtype, tuple(DTYPE_BYTES)),
        ]
        for key, value, allowed in checks:
            if value not in allowed:
                raise SlimtuneError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        for key in ("rank", "batch_size", "max_length", "blocksize"):
            if getattr(self, key) <= 0:
                raise SlimtuneError(f"{key}: must be positive, got {getattr(self, key)}")


@dataclass
class MemoryEstimate:
    architecture: Architecture
    settings: PlanSettings
    parts: dict[str, int]
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def error_band(self) -> tuple[float, float] | None:
        """(lowest, highest) measured error of the planner on this device; None: uncalibrated."""
        return ERROR_BAND.get(self.settings.device)

    def likely_range(self) -> tuple[int, int] | None:
        """The peak a run will likely measure, given the planner's measured error band."""
        if self.error_band is None:
            return None
        low, high = self.error_band
        return int(self.total / (1 + high)), int(self.total / (1 + low))

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
        out["settings"] = asdict(self.settings)
        return out


def lora_targets(arch: Architecture, targets: str | list[str]) -> list[tuple[str, int, int]]:
    """The block linears that get an adapter: 'all-linear', a list of names, or a regex."""
    linears = arch.block_linears()
    if targets == "all-linear":
        chosen = linears
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = [
            x
            for x in linears
            if pattern.fullmatch(f"model.layers.0.x.{x[0]}") or pattern.search(x[0])
        ]
    else:
        # a list of names, and for experts PEFT's target_parameters names (experts.down_proj)
        chosen = [x for x in linears if x[0] in targets or x[0].rpartition(".")[2] in targets
                  and not x[0].startswith("experts.")]  # fmt: skip
    if not chosen:
        names = ", ".join(name for name, _, _ in linears)
        raise SlimtuneError(f"targets: {targets!r} matches none of this model's layers ({names})")
    return chosen


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


def quantized_bytes(numel: int, s: PlanSettings) -> tuple[int, int]:
    """(packed 4-bit codes, quantization constants) of one weight of `numel` elements."""
    blocks = -(-numel // s.blocksize)
    # Double quantization: uint8 absmax codes, a float32 scale per 256 of them, the offset.
    constants = blocks + 4 * -(-blocks // 256) + 4 if s.double_quant else 4 * blocks
    return numel // 2 + numel % 2, constants


def estimate(arch: Architecture, s: PlanSettings) -> MemoryEstimate:
    """The memory a training step of `arch` with settings `s` needs at its peak."""
    wbytes, abytes = DTYPE_BYTES[s.weight_dtype], DTYPE_BYTES[s.adapter_dtype]
    parts = dict.fromkeys(PARTS, 0)
    parts["runtime"] = RUNTIME_BYTES[s.device]
    uses_numba = s.method == "qlora" or (s.method == "lora" and s.dropout > 0)
    if uses_numba and s.device == "cpu":
        parts["runtime"] += KERNEL_RUNTIME_BYTES
    block_linear = arch.num_layers * arch.block_linear_params()
    other = arch.num_params() - block_linear
    head = arch.vocab_size * arch.hidden_size

    if s.method == "qlora":
        codes = constants = 0
        for _, n_in, n_out in arch.block_linears():
            c, k = quantized_bytes(n_in * n_out, s)
            codes, constants = codes + c, constants + k
        codes, constants = codes * arch.num_layers, constants * arch.num_layers
        if s.quantize_lm_head and not arch.tie_embeddings:
            c, k = quantized_bytes(head, s)
            codes, constants, other = codes + c, constants + k, other - head
        parts["weights"] = codes + other * wbytes
        parts["quant_constants"] = constants
    else:
        parts["weights"] = arch.num_params() * wbytes

    notes: list[str] = []
    if s.method == "full":
        trainable_sizes = [
            n_in * n_out for _, n_in, n_out in arch.block_linears()
        ] * arch.num_layers
        trainable_sizes += [other]  # embeddings, norms: their sizes only matter for 8-bit
        trainable = arch.num_params()
        parts["gradients"] = trainable * wbytes
    else:
        chosen = lora_targets(arch, s.targets)
        trainable_sizes = [s.rank * n for _, n_in, n_out in chosen for n in (n_in, n_out)]
        trainable_sizes *= arch.num_layers
        trainable = sum(trainable_sizes)
        parts["lora_weights"] = trainable * abytes
        parts["gradients"] = trainable * abytes
    parts["optimizer_state"] = optimizer_state_bytes(trainable_sizes, s.optimizer)
    if s.optimizer.startswith("paged") and s.device == "cuda":
        notes.append("paged optimizer: its state lives in host RAM and is counted here anyway")
    parts["activations"] = activation_bytes(arch, s)
    if s.objective != "sft":
        # A preference step keeps one side's activations at a time (B rows of up to
        # max_length, as a supervised step of that batch); the other side's forward pass
        # without gradients and the cached reference log-probs add little
        # (benchmarks/bench_preference.py).
        notes.append(f"{s.objective}: batch_size pairs; one side's activations at a time, as sft")
    return MemoryEstimate(arch, s, parts, trainable, notes)
