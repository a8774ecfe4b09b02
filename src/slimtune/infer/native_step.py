"""A decode step in one C call (`llama_step.c`): the lean forward for one new token per row
with nothing between the products but C.

The decode loop (one stream) and the serving batch (many, each row its own adapter) call it
for every step of a model it can read: a LLaMA-family decoder (`llama.supports`) whose block
projections are all 4-bit layers the C kernels read, with plain LoRA adapters (no DoRA),
float32 norms, embeddings and KV cache, SiLU MLP. `NativeDecoder.build` returns None for
anything else and the caller runs the lean forward instead. Results equal the lean forward's
to float rounding (tests/test_native_step.py).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.infer.llama import KVCache, Rotary, _head_dim, norm_eps, supports
from slimtune.lora.layer import LoraLinear
from slimtune.quant import Linear4bit, native
from slimtune.quant.gemv import NATIVE_ROWS, native_layout
from slimtune.quant.inference import kernel_weight

SOURCE = Path(__file__).with_name("llama_step.c")
# Rows up to which a step runs in C: the 4-bit kernel's range (more rows decode bands for BLAS).
MAX_ROWS = NATIVE_ROWS
# Prompts a prefill runs in C for (in_c_prefill). Its attention runs per row over the row's
# columns, quadratic in the prompt, and its products take 8 rows at a time where the lean
# forward's BLAS takes whole matrices. SmolLM2 in NF4 (benchmarks/reports/step.md): with
# AVX-512, C was 1.1-2x the lean forward from 64 to 1024 tokens (longer is not measured); with
# AVX2 in float32, 1.24x at 96 tokens, even at 128-160, 0.77x at 256 and 0.47x at 1024, and
# for 4-16 prompts over 3 adapters 1.19x at 128 tokens in all, 0.74-0.91x at 384-640. In
# bfloat16 on AVX2 the lean forward's torch ops emulate bfloat16 and C stays the faster.
PREFILL_COLUMNS = 1024
PREFILL_TOKENS_NARROW = 128  # in all, float32 layers, kernels narrower than AVX-512 (AVX2, C)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
RANKS = 16  # llama_step.c's adapters: ranks padded to a multiple of this

_p = ctypes.c_void_p
_i64 = ctypes.c_int64


class _Adapter(ctypes.Structure):
    _fields_ = [("a_t", _p), ("b_t", _p), ("rank", _i64), ("scaling", ctypes.c_float)]


class _Projection(ctypes.Structure):
    _fields_ = [("weight", ctypes.POINTER(native.Weight4)), ("bias", _p),
                ("adapters", ctypes.POINTER(_Adapter)), ("bf16", ctypes.c_int)]  # fmt: skip


class _Block(ctypes.Structure):
    _fields_ = [*((name, _Projection) for name in PROJECTIONS), ("input_norm", _p),
                ("post_norm", _p)]  # fmt: skip


class _Decoder(ctypes.Structure):
    _fields_ = [*((name, _i64) for name in ("hidden", "heads", "kv_heads", "head_dim",
                "intermediate", "blocks", "slots")),
                ("eps", ctypes.c_float), ("attention_scale", ctypes.c_float),
                ("block", ctypes.POINTER(_Block)), ("final_norm", _p),
                ("embedding", _p)]  # fmt: skip


class _Batch(ctypes.Structure):
    _fields_ = [("rows", _i64), ("sequences", _i64), ("capacity", _i64),
                ("keys", ctypes.POINTER(_p)), ("values", ctypes.POINTER(_p)),
                *((name, ctypes.POINTER(_i64))
                  for name in ("tokens", "sequence", "column", "start", "slot")),
                ("cos", _p), ("signed_sin", _p)]  # fmt: skip


@cache
def library() -> ctypes.CDLL | None:
    """The step compiled with the 4-bit kernels; None where those are off or cannot build."""
    signature = [ctypes.POINTER(_Decoder), ctypes.POINTER(_Batch), _p, ctypes.c_int]
    return native.companion(SOURCE, "llama_step", {"slim_llama_step": signature},
                            "the C decode step")  # fmt: skip
    signature = [ctypes.POINTER(_Decoder), ctypes.POINTER(_Batch), _p, ctypes.c_int]


def _float32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.device.type == "cpu")


def _readable(tensors: list[torch.Tensor]) -> bool:
    """Whether C reads these in place: float32 on the CPU, contiguous."""
    return all(_float32(t) and t.is_contiguous() for t in tensors)


class NativeDecoder:
    """The model described to `slim_llama_step` once: pointers to its tensors (kept alive here)
    and, per projection, one adapter per slot. `step` runs a batch's decode step."""

    def __init__(self, model: nn.Module, parts: list[list[tuple]], slots: int) -> None:
        self.model = model
        self.lib = library()
        self._keep: list = []
        config, inner = model.config, model.model
        blocks = [self._block(block, layer, slots)
                  for block, layer in zip(parts, inner.layers, strict=True)]  # fmt: skip
        self._blocks = (_Block * len(blocks))(*blocks)
        self.hidden = config.hidden_size
        self.bf16 = any(part[3] for block in parts for part in block)
        self.struct = _Decoder(
            hidden=self.hidden, heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads, head_dim=_head_dim(config),
            intermediate=config.intermediate_size, blocks=len(blocks), slots=slots,
            eps=norm_eps(inner.norm), attention_scale=inner.layers[0].self_attn.scaling,
            block=self._blocks, final_norm=inner.norm.weight.data_ptr(),
            embedding=inner.embed_tokens.weight.data_ptr(),
        )  # fmt: skip

    @classmethod
    def build(
        cls,
        model: nn.Module,
        compute_dtype: torch.dtype | None,
        adapters: list[str] | None = None,
    ) -> NativeDecoder | None:
        """The decoder for `model`, or None where the C step does not cover it (the caller runs
        the lean forward). `adapters`: the names of the slots rows choose from (serving), or
        None for one slot holding each layer's live adapter (one stream as the model stands)."""
        if library() is None or not supports(model) or not _plain(model):
            return None
        parts = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            modules = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                       mlp.up_proj, mlp.down_proj)  # fmt: skip
            block = [_projection(m, compute_dtype, adapters) for m in modules]
            if any(p is None for p in block):
                return None
            parts.append(block)
        return cls(model, parts, 1 if adapters is None else max(1, len(adapters)))

    def _block(self, parts: list[tuple], layer: nn.Module, slots: int) -> _Block:
        fields = {name: self._projection(*p, slots)
                  for name, p in zip(PROJECTIONS, parts, strict=True)}  # fmt: skip
        return _Block(**fields, input_norm=layer.input_layernorm.weight.data_ptr(),
                      post_norm=layer.post_attention_layernorm.weight.data_ptr())  # fmt: skip

    def _projection(self, layer: Linear4bit, bias, adapters: list, bf16: bool, slots: int):
        weight = kernel_weight(layer)
        table = (_Adapter * slots)()
        for slot, adapter in enumerate(adapters):
            if adapter is not None:
                a_t, b_t, scaling = adapter
                table[slot] = _Adapter(a_t.data_ptr(), b_t.data_ptr(), a_t.shape[1], scaling)
        self._keep += [weight, bias, adapters, table]
        return _Projection(weight=ctypes.pointer(weight.struct), bias=_ptr(bias),
                           adapters=table, bf16=int(bf16))  # fmt: skip

    @torch.no_grad()
    def step(
        self,
        tokens: list[int],
        cache: KVCache,
        rotary: Rotary,
        start: list[int] | None = None,
        slots: list[int] | None = None,
    ) -> torch.Tensor:
        """Float32 logits (rows, vocab) of one new token per row, written to the cache's next
        column. `start`: each row's first cached column (left padding; default 0); `slots`:
        each row's adapter slot, -1 for none (default 0)."""
        rows, start = len(tokens), start or [0] * len(tokens)
        if cache.keys[0].shape[0] != rows or cache.length >= cache.capacity:
            raise ValueError(f"a step of {rows} rows does not fit the cache")
        hidden = self._run(
            tokens, list(range(rows)), [cache.length] * rows, start, slots or [0] * rows,
            cache, rotary,
        )  # fmt: skip
        cache.length += 1
        return self.model.lm_head(hidden).float()

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor,
        valid: torch.Tensor,
        cache: KVCache,
        rotary: Rotary,
        slots: list[int] | None = None,
    ) -> torch.Tensor:
        """Float32 logits (sequences, vocab) after left-padded prompts `ids` (sequences, width;
        `valid` False on padding), every prompt token's keys and values written to its column
        of the empty `cache`. `slots`: each sequence's adapter slot, -1 for none (default 0).
        The columns go in chunks of at most MAX_ROWS tokens, in order: a chunk's tokens see the
        columns before them and each other, causally."""
        sequences, width = ids.shape
        if cache.length != 0 or cache.capacity < width or not bool(valid[:, -1].all()):
            raise ValueError("prefill takes left-padded prompts into an empty cache")
        if sequences > MAX_ROWS:
            raise ValueError(f"a prefill of {sequences} prompts is more than {MAX_ROWS} rows")
        slots = slots or [0] * sequences
        start, prompts = valid.int().argmax(-1).tolist(), ids.tolist()
        columns = [torch.nonzero(valid[:, c]).view(-1).tolist() for c in range(width)]
        chunk: list[tuple[int, int]] = []  # (column, sequence) of the chunk's tokens
        for column, rows in enumerate(columns):
            chunk += [(column, s) for s in rows]
            if column + 1 < width and len(chunk) + len(columns[column + 1]) <= MAX_ROWS:
                continue  # whole columns per chunk: the last column's tokens come out together
            hidden = self._run(
                [prompts[s][c] for c, s in chunk], [s for _, s in chunk], [c for c, _ in chunk],
                [start[s] for _, s in chunk], [slots[s] for _, s in chunk], cache, rotary,
            )  # fmt: skip
            chunk = []
        padding = ~valid[:, None, :, None]  # zeros there, as a masked attention reads them
        for t in (*cache.keys, *cache.values):
            t[:, :, :width].masked_fill_(padding, 0.0)
        cache.length = width
        return self.model.lm_head(hidden[-sequences:]).float()  # the last column's tokens

    def _run(self, tokens, sequence, column, start, slot, cache, rotary) -> torch.Tensor:
        """The final-norm hidden states (rows, hidden) of the rows (token, sequence, column,
        first column, adapter slot); their keys and values written to the cache."""
        if max(c - s for c, s in zip(column, start, strict=True)) >= len(rotary.cos):
            raise ValueError("a position is past the rotary tables")
        rows = len(tokens)
        keys = (_p * len(cache.keys))(*(k.data_ptr() for k in cache.keys))
        values = (_p * len(cache.values))(*(v.data_ptr() for v in cache.values))
        row_ints = _i64 * rows
        batch = _Batch(
            rows=rows, sequences=cache.keys[0].shape[0], capacity=cache.capacity, keys=keys,
            values=values, tokens=row_ints(*tokens), sequence=row_ints(*sequence),
            column=row_ints(*column), start=row_ints(*start), slot=row_ints(*slot),
            cos=rotary.cos.data_ptr(), signed_sin=rotary.signed_sin.data_ptr(),
        )  # fmt: skip
        out = torch.empty(rows, self.hidden)
        status = self.lib.slim_llama_step(
            ctypes.byref(self.struct), ctypes.byref(batch), out.data_ptr(), torch.get_num_threads()
        )
        if status != 0:
            raise RuntimeError("the C decode step could not run (a shape the kernels refuse)")
        return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _plain(model: nn.Module) -> bool:
    """Float32 embeddings and norms, SiLU MLP, one norm epsilon."""
    inner, config = model.model, model.config
    norms = [inner.norm] + [n for layer in inner.layers
                            for n in (layer.input_layernorm, layer.post_attention_layernorm)]  # fmt: skip
    tensors = [inner.embed_tokens.weight, *(n.weight for n in norms)]
    return (
        type(inner.embed_tokens) is nn.Embedding
        and getattr(config, "hidden_act", None) == "silu"
        and _readable(tensors)
        and len({norm_eps(n) for n in norms}) == 1
        and config.num_attention_heads % config.num_key_value_heads == 0
    )


def in_c_prefill(valid: torch.Tensor, bf16: bool = False) -> bool:
    """Whether left-padded prompts (`valid`: (sequences, width), False on padding) prefill in
    C: every prompt has a token, at most MAX_ROWS prompts, and where the kernels have AVX-512 or
    the layers compute in bfloat16 (`bf16`) prompts of at most PREFILL_COLUMNS tokens, else at
    most PREFILL_TOKENS_NARROW prompt tokens in all."""
    sequences, width = valid.shape
    if bf16 or native.lanes() >= 16:
        short = width <= PREFILL_COLUMNS
    else:
        short = int(valid.sum()) <= PREFILL_TOKENS_NARROW
    return sequences <= MAX_ROWS and short and bool(valid[:, -1].all())


def usable(cache: KVCache, rotary: Rotary) -> bool:
    """Whether the C step can write into `cache` with `rotary`'s tables: float32, contiguous."""
    return _readable([rotary.cos, rotary.signed_sin, *cache.keys, *cache.values])


def _projection(module: nn.Module, compute_dtype: torch.dtype | None, names: list[str] | None):
    """(4-bit layer, float32 bias, [(A, B.T, scaling) or None per slot], bf16 output) of a block
    projection the C step computes, or None."""
    adapters: list = []  # slots past the end have no adapter here
    if isinstance(module, LoraLinear):
        if names is None:  # one slot: the layer as it stands
            if module.sample_groups is not None:
                return None
            live = [] if module.disabled else module._live
            if len(live) > 1:
                return None
        else:
            live = [] if module.disabled else names
        adapters = [_adapter(module, name) for name in live]
        if any(a is False for a in adapters):
            return None
        module = module.base_layer
    if not isinstance(module, Linear4bit) or module.weight.device.type != "cpu":
        return None
    if not native_layout(module.quant_state):
        return None
    dtype = compute_dtype or module.compute_dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    bias = None if module.bias is None else module.bias.detach().float().contiguous()
    return module, bias, adapters, dtype == torch.bfloat16


def _adapter(module: LoraLinear, name: str):
    """(A transposed, B transposed, scaling) of adapter `name` in this layer, the rank padded
    with zeros to a multiple of RANKS (as llama_step.c reads them); None where the layer lacks
    it; False where the C step cannot compute it (DoRA, not float32)."""
    if name not in module.lora_A:
        return None
    if name in module.lora_magnitude_vector or name in module.merged_adapters:
        return False
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    if not (_float32(a) and _float32(b)):
        return False
    padding = -a.shape[0] % RANKS
    a_t = F.pad(a.detach().t(), (0, padding)).contiguous()  # (in, rank): zero columns added
    b_t = F.pad(b.detach().t(), (0, 0, 0, padding)).contiguous()  # (rank, out): zero rows added
    return a_t, b_t, float(module.scaling[name])
