"""slimtune.dist: the single-process no-op path, and 2 real gloo processes on this machine."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimtune.dist import (
    DistInfo,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_parameters,
    full_optimizer_state,
    full_trainable,
    init_distributed,
    main_process_first,
    shard_batch,
    shard_bounds,
    shard_model,
    shard_optimizer_state,
    shutdown_distributed,
)
from slimtune.errors import SlimtuneError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(no_torchrun):
    info = init_distributed()
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.is_distributed and info.backend is None
    assert not dist.is_initialized()  # no process group for one process

    batch = {"input_ids": torch.arange(6).view(3, 2), "labels": [1, 2, 3]}
    assert shard_batch(batch, info) is batch
    t = torch.tensor([2.0, 3.0])
    assert all_reduce_sum(t, info) is t and t.tolist() == [2.0, 3.0]
    assert all_reduce_sum(7, info) == 7

    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 5.0)
    all_reduce_gradients([p], info)
    assert p.grad.tolist() == [5.0, 5.0]
    barrier(info)
    with main_process_first(info):
        pass
    shutdown_distributed(info)


def test_bad_environment_is_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(SlimtuneError, match="RANK=2 is outside WORLD_SIZE=2"):
        init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(SlimtuneError, match="WORLD_SIZE='two'"):
        init_distributed()


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_bounds_partition_the_rows_in_order(rows, world):
    bounds = [shard_bounds(rows, r, world) for r in range(world)]
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(rows))  # every row once, in the global order
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_shard_batch_of_a_dict_of_tensors_and_lists():
    batch = {"input_ids": torch.arange(10).view(5, 2), "text": list("abcde")}
    shards = [shard_batch(batch, DistInfo(rank=r, world_size=2, backend="gloo")) for r in (0, 1)]
    assert [s["text"] for s in shards] == [list("abc"), list("de")]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    with pytest.raises(ValueError, match="disagree"):
        shard_batch({"a": [1, 2], "b": [1]}, DistInfo(rank=0, world_size=2, backend="gloo"))


def test_gradient_buckets_split_by_dtype_and_size():
    from slimtune.dist.reduce import _buckets

    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(2, dtype=torch.float64), torch.zeros(8)]
    sizes = [[len(g) for g in b] for b in _buckets(grads, bucket_bytes=32)]
    assert sizes == [[4, 4], [2], [8]]  # 32 bytes fit two fp32 x 4; a dtype change splits


# ---- two real processes ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum of per-row losses (a stand-in for the sum of per-token losses)."""
    return ((model(x) - y) ** 2).sum()


def _make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)  # frozen: must be left alone
    return model


def _check_gradients(info: DistInfo, rows: int, bucket_bytes: int) -> None:
    """N ranks x their shard, global normaliser, summed gradients == 1 process x all rows."""
    gen = torch.Generator().manual_seed(rows)
    x, y = torch.randn(rows, 4, generator=gen), torch.randn(rows, 2, generator=gen)

    reference = _make_model()
    (_loss_sum(reference, x, y) / rows).backward()

    model = _make_model()
    xs, ys = shard_batch(x, info), shard_batch(y, info)
    global_rows = all_reduce_sum(len(xs), info)
    assert global_rows == rows
    if len(xs):  # a rank may have no rows in a short last batch: it still joins the reduce
        (_loss_sum(model, xs, ys) / global_rows).backward()
    all_reduce_gradients(model.parameters(), info, bucket_bytes=bucket_bytes)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        else:
            assert p.grad is None


class _Toy4bitLora(torch.nn.Module):
    """The FSDP design's 4-bit layer: packed bytes as a frozen *parameter* of dtype `storage`
    (FSDP shards parameters, not buffers), the quant state replicated on every rank."""

    def __init__(self, weight: torch.Tensor, storage: torch.dtype, rank: int = 4):
        super().__init__()
        import bitsandbytes.functional as bnbf

        packed, self.quant_state = bnbf.quantize_4bit(
            weight, quant_type="nf4", compress_statistics=True, quant_storage=storage
        )
        self.weight = torch.nn.Parameter(packed, requires_grad=False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, weight.shape[1]) * 0.1)
        self.lora_B = torch.nn.Parameter(torch.randn(weight.shape[0], rank) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        self.gathered = self.weight.detach().reshape(-1).view(torch.uint8).clone()
        w = bnbf.dequantize_4bit(self.weight, self.quant_state).to(x.dtype)
        return x @ w.t() + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype)


def _check_fsdp2_shards_a_4bit_layer(info: DistInfo, storage: torch.dtype, mixed: bool) -> None:
    """docs/distributed.md, FSDP + QLoRA: FSDP2 shards the packed weight evenly, the gathered
    bytes are the original ones, and a data parallel step gives the unsharded gradients."""
    import copy

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        _Toy4bitLora(torch.randn(96, 64), storage), _Toy4bitLora(torch.randn(64, 96), storage)
    )
    reference = copy.deepcopy(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed else None)
    for unit in [*model, model]:
        fully_shard(unit, mp_policy=policy)
        unit.set_gradient_divide_factor(1.0)  # sum, per unit: the loss has the normaliser
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM

    for layer, ref in zip(model, reference, strict=True):
        local = layer.weight.to_local()
        assert local.dtype == storage and local.shape[0] == ref.weight.shape[0] // 2

    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    rows = shard_batch(x, info)
    model(rows).float().pow(2).sum().div(len(x)).backward()
    reference(x).pow(2).sum().div(len(x)).backward()
    for layer, ref in zip(model, reference, strict=True):
        assert torch.equal(layer.gathered, ref.gathered)  # no cast touched the packed bytes
        if not mixed:
            for name in ("lora_A", "lora_B"):
                grad = getattr(layer, name).grad.full_tensor()
                # float32 sums in another order: relative error ~1e-5 on gradients of ~1e3
                torch.testing.assert_close(grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-3)


def _tiny_qlora() -> torch.nn.Module:
    """A tiny LLaMA with tied input and output embeddings (one FSDP unit holds both; the
    torchrun tests train an untied one), its linear layers in NF4 with double quantization,
    and a rank-4 adapter whose B is not zero (so that the adapter counts in the loss)."""
    from helpers import make_tiny_llama

    from slimtune.quant import QuantConfig, quantize_model

    return _with_adapter(quantize_model(make_tiny_llama(tie_word_embeddings=True), QuantConfig()))


def _with_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with a rank-4 adapter whose B is not zero, in training mode."""
    from slimtune.lora import LoraConfig, inject_adapter

    torch.manual_seed(1)
    inject_adapter(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model.train()


def _check_shard_model(info: DistInfo) -> None:
    """shard_model: each rank holds half of every 4-bit tensor and of the adapter; the sharded
    loss and the summed LoRA gradients are those of one process on the whole batch; whole
    tensors and optimizer state go out and back in unchanged."""
    from torch.distributed.tensor import DTensor

    from slimtune.train.forward import summed_loss

    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    reference, model = _tiny_qlora(), _tiny_qlora()
    expected = summed_loss(reference, batch)
    expected.backward()

    root = shard_model(model, summed_loss, info)
    q = model.model.layers[0].self_attn.q_proj
    for tensor in (q.base_layer.weight, q.base_layer.absmax, q.lora_A["default"].weight):
        assert isinstance(tensor, DTensor) and tensor.to_local().shape[0] == tensor.shape[0] // 2
    assert q.base_layer.weight.dtype == torch.uint8 and q.base_layer.absmax.dtype == torch.uint8

    loss = root(shard_batch(batch, info))
    loss.backward()
    torch.testing.assert_close(all_reduce_sum(loss.detach(), info), expected.detach())
    refs = dict(reference.named_parameters())
    trained = [(name, p, refs[name]) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for name, param, ref in trained:
        torch.testing.assert_close(param.grad.full_tensor(), ref.grad, msg=name)

    a = q.lora_A["default"].weight
    with full_trainable(model):
        whole = q.lora_A["default"].weight
        assert not isinstance(whole, DTensor) and whole.shape == a.shape
        with torch.no_grad():
            whole.add_(1.0)  # written back to the shards on exit
    assert q.lora_A["default"].weight is a
    start = reference.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    torch.testing.assert_close(a.full_tensor(), start + 1.0)

    params = [param for _, param, _ in trained]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    optimizer.step()
    state = full_optimizer_state(optimizer)
    first = state["state"][0]["exp_avg"]
    assert not isinstance(first, DTensor) and first.shape == params[0].shape
    assert isinstance(optimizer.state[params[0]]["exp_avg"], DTensor)  # its own left sharded
    again = torch.optim.AdamW(params, lr=0.1)
    again.load_state_dict(state)
    shard_optimizer_state(again)
    for param in params:
        for key in ("exp_avg", "exp_avg_sq"):
            mine, theirs = again.state[param][key], optimizer.state[param][key]
            assert isinstance(mine, DTensor) and torch.equal(mine.to_local(), theirs.to_local())


def _loaded_qlora(folder: str, keep_part) -> torch.nn.Module:
    """The tied-embeddings LLaMA folder loaded into NF4 (in parts with a LoadedPart), with the
    adapter of _tiny_qlora (B not zero)."""
    from slimtune.models import load_model
    from slimtune.quant import QuantConfig

    return _with_adapter(load_model(folder, quant=QuantConfig(), keep_part=keep_part)[0])


def _check_sharded_loading(info: DistInfo, folder: str) -> None:
    """Loaded in parts (each rank its rows of every tensor FSDP shards, the tied embeddings and
    output layer among them, unevenly cut), then sharded: every rank holds exactly the shards
    of the model loaded whole and sharded, and computes the same loss."""
    from torch.distributed.tensor import DTensor

    from slimtune.dist import LoadedPart
    from slimtune.train.forward import summed_loss

    whole = _loaded_qlora(folder, None)
    parted = _loaded_qlora(folder, LoadedPart(info.rank, info.world_size))
    embeddings = parted.get_input_embeddings().weight
    assert embeddings is parted.get_output_embeddings().weight  # still tied
    assert embeddings.shape[0] == (51 if info.rank == 0 else 50)  # 101 rows, cut as torch.chunk

    whole_root = shard_model(whole, summed_loss, info)
    parted_root = shard_model(parted, summed_loss, info)
    named = dict(parted.named_parameters())
    assert named.keys() == dict(whole.named_parameters()).keys()
    for name, param in whole.named_parameters():
        mine = named[name]
        assert isinstance(mine, DTensor) and mine.shape == param.shape, name
        assert torch.equal(mine.to_local(), param.to_local()), name
    assert parted.get_input_embeddings().weight is parted.get_output_embeddings().weight

    ids = torch.randint(3, 101, (4, 12), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    batch = shard_batch(batch, info)
    assert torch.equal(parted_root(batch), whole_root(batch))


def _worker(local_rank: int, world_size: int, port: int, scratch: str) -> None:
    torch.set_num_threads(1)  # two processes share the two cores
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank) == (local_rank, world_size, local_rank)
    assert info.backend == "gloo" and info.device == torch.device("cpu")
    assert info.is_main == (local_rank == 0) and info.is_distributed
    assert init_distributed() == info  # idempotent

    # Shards of a global batch: disjoint, in order, and together the whole batch.
    batch = {"ids": torch.arange(14).view(7, 2), "rows": list(range(7))}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, shard_batch(batch, info)["rows"])
    assert [r for shard in gathered for r in shard] == list(range(7))

    t = torch.tensor([1.0, float(info.rank)])
    assert all_reduce_sum(t, info) is t and t.tolist() == [2.0, 1.0]
    assert all_reduce_sum(info.rank + 0.5, info) == 2.0

    _check_gradients(info, rows=6, bucket_bytes=32 * 1024 * 1024)  # one bucket
    _check_gradients(info, rows=3, bucket_bytes=16)  # uneven shards, a bucket per tensor
    _check_gradients(info, rows=1, bucket_bytes=64)  # rank 1 has no rows at all

    p = torch.nn.Parameter(torch.full((3,), float(info.rank)))
    broadcast_parameters([p], info)
    assert p.tolist() == [0.0, 0.0, 0.0]

    _check_fsdp2_shards_a_4bit_layer(info, torch.uint8, mixed=False)
    _check_fsdp2_shards_a_4bit_layer(info, torch.bfloat16, mixed=False)  # + fp32 LoRA
    _check_fsdp2_shards_a_4bit_layer(info, torch.uint8, mixed=True)  # bf16 casts skip uint8
    _check_shard_model(info)
    _check_sharded_loading(info, os.path.join(scratch, "tied-model"))

    marker = os.path.join(scratch, "written-by-main")
    with main_process_first(info):
        if info.is_main:
            open(marker, "w").close()
        assert os.path.exists(marker)  # rank 1 only enters after rank 0 left the block
    barrier(info)
    shutdown_distributed(info)
    assert not dist.is_initialized()


@pytest.mark.processes
def test_two_gloo_processes():
    from helpers import save_char_model

    with tempfile.TemporaryDirectory() as scratch:
        # A vocabulary of 101: the tied embeddings split 51 / 50 over the 2 ranks.
        save_char_model(Path(scratch) / "tied-model", vocab_size=101, tie_word_embeddings=True)
        mp.spawn(_worker, args=(2, _free_port(), scratch), nprocs=2, join=True)
