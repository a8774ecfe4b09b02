"""A LLaMA-2-7B-shaped model trained with QLoRA in ~6 GiB of RAM, built straight into 4 bits.

slimtune: the model skeleton is made on the meta device; each block's linear weights are then
created one at a time (random, float32), quantized to NF4 + double quantization with
slimtune.quant, and dropped, so the float model (27 GB in float32) never exists. LoRA goes on
every linear layer of the blocks; training steps run with gradient checkpointing at batch
1 x 512, exactly as `slimtune train` runs them.

peer (--peer): transformers + peft + bitsandbytes loading a saved random bf16 checkpoint
(`--write-checkpoint DIR` makes one, layer by layer, ~13.5 GB) with BitsAndBytesConfig, then
the same steps with peft's LoRA and bitsandbytes' AdamW8bit.

Peak RSS is read from /proc (VmHWM) for the build and, after a reset, for the training steps.

    .venv/bin/python benchmarks/bench_7b.py --steps 2 --json out.json
    .venv/bin/python benchmarks/bench_7b.py --write-checkpoint /tmp/llama7b-random
    .venv/bin/python benchmarks/bench_7b.py --peer /tmp/llama7b-random --steps 1 --heap glibc
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
from pathlib import Path

import torch

from slimtune.hardware import machine_record

SHAPE = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
STD = 0.02  # LLaMA's initializer_range


def status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def config(layers: int, shape: dict = SHAPE):
    from transformers import LlamaConfig

    return LlamaConfig(**dict(shape, num_hidden_layers=layers))


# --------------------------------------------------------------------------- slimtune


def build_4bit(
    layers: int, embed_dtype: torch.dtype, shape: dict = SHAPE, keep_part=None
) -> torch.nn.Module:
    """The model with every block linear in NF4, never holding more than one float weight;
    `shape`: LlamaConfig settings (LLaMA-2-7B's by default). `keep_part` (a
    slimtune.dist.LoadedPart) is called for every tensor put in place, as the loaders call it."""
    from torch import nn

    def place(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        setattr(module, name, nn.Parameter(tensor))
        if keep_part is not None:
            keep_part(module, name)

    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from slimtune.quant import Linear4bit, QuantConfig

    cfg = config(layers, shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    quant = QuantConfig(quant_type="nf4", blocksize=64, double_quant=True)
    generator = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    shape = (child.out_features, child.in_features)
                    float_layer = nn.Linear(
                        child.in_features, child.out_features, bias=False, device="meta"
                    )
                    float_layer.weight = nn.Parameter(torch.randn(shape, generator=generator) * STD)
                    layer = Linear4bit.from_linear(float_layer, quant)
                    setattr(parent, name, layer)
                    del float_layer  # the float weight goes here
                    for tensor_name in Linear4bit.SHARDABLE if keep_part else ():
                        keep_part(layer, tensor_name)
        print(
            f"block {block.self_attn.layer_idx} in 4 bits, rss {status_mib('VmRSS'):.0f} MiB",
            flush=True,
        )
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            place(norm, "weight", torch.ones(cfg.hidden_size))
    place(model.model.norm, "weight", torch.ones(cfg.hidden_size))
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=generator) * STD
    place(model.model.embed_tokens, "weight", embed.to(embed_dtype))
    del embed
    head = torch.randn(cfg.vocab_size, cfg.hidden_size, generator=generator) * STD
    place(model.lm_head, "weight", head.to(embed_dtype))
    del head
    model.model.rotary_emb = LlamaRotaryEmbedding(cfg)  # its buffers were made on meta
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run_slimtune(args) -> dict:
    from slimtune.lora import LoraConfig, inject_adapter
    from slimtune.optim import build_optimizer
    from slimtune.train.forward import summed_loss

    began = time.perf_counter()
    model = build_4bit(args.layers, getattr(torch, args.embed_dtype))
    model.config.use_cache = False
    torch.manual_seed(0)
    inject_adapter(
        model, LoraConfig(r=args.rank, alpha=16, dropout=0.05, target_modules="all-linear")
    )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args.optimizer, params, lr=2e-4, weight_decay=0.0)
    _warm_state(optimizer, params)
    build_s = time.perf_counter() - began
    build_peak = status_mib("VmHWM")
    ids = torch.randint(
        0, SHAPE["vocab_size"], (1, args.length), generator=torch.Generator().manual_seed(1)
    )
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}

    def step() -> float:
        loss = summed_loss(model, batch) / (args.length - 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return _train(step, args, build_s, build_peak, sum(p.numel() for p in params))


# --------------------------------------------------------------------------- peer


def write_checkpoint(folder: Path, layers: int) -> None:
    """A random bf16 LLaMA-2-7B-shaped checkpoint in HF layout, one shard per block."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = config(layers)
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    h, i = cfg.hidden_size, cfg.intermediate_size
    shards = layers + 1
    index: dict[str, str] = {}
    total = 0

    def randn(*shape):
        return (torch.randn(shape, generator=generator) * STD).to(torch.bfloat16)

    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        if n == layers:
            tensors = {
                "model.embed_tokens.weight": randn(cfg.vocab_size, h),
                "lm_head.weight": randn(cfg.vocab_size, h),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
            }
        else:
            p = f"model.layers.{n}."
            shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h),
                      "self_attn.v_proj": (h, h), "self_attn.o_proj": (h, h),
                      "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}  # fmt: skip
            tensors = {f"{p}{k}.weight": randn(*s) for k, s in shapes.items()}
            tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        index.update(dict.fromkeys(tensors, name))
        print(f"wrote {name}", flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )


def run_peer(args) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    began = time.perf_counter()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.peer,
        quantization_config=quant,
        dtype=getattr(torch, args.embed_dtype),
        device_map="cpu",
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    lora = LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=2e-4, weight_decay=0.0)
    _warm_state(optimizer, params)
    build_s = time.perf_counter() - began
    build_peak = status_mib("VmHWM")
    ids = torch.randint(
        0, SHAPE["vocab_size"], (1, args.length), generator=torch.Generator().manual_seed(1)
    )

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return _train(step, args, build_s, build_peak, sum(p.numel() for p in params))


# --------------------------------------------------------------------------- common


def _warm_state(optimizer, params) -> None:
    """One step on zero gradients: allocates the optimizer state, leaves the weights as they are
    (no weight decay), so that the first measured step already carries the full state."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _train(step, args, build_s: float, build_peak: float, trainable: int) -> dict:
    reset_peak()
    after_build = status_mib("VmRSS")
    times, losses = [], []
    for n in range(args.steps):
        began = time.perf_counter()
        print(f"step {n + 1} starts, rss {status_mib('VmRSS'):.0f} MiB", flush=True)
        losses.append(step())
        times.append(time.perf_counter() - began)
        print(f"step {n + 1}: loss {losses[-1]:.4f}, {times[-1]:.0f} s, "
              f"peak {status_mib('VmHWM'):.0f} MiB", flush=True)  # fmt: skip
    return {
        "stack": "peer" if args.peer else "slimtune",
        "layers": args.layers, "rank": args.rank, "length": args.length,
        "embed_dtype": args.embed_dtype, "optimizer": args.optimizer if not args.peer else "bnb AdamW8bit",
        "trainable_params": trainable, "build_seconds": build_s, "build_peak_mib": build_peak,
        "rss_after_build_mib": after_build, "train_peak_mib": status_mib("VmHWM"),
        "step_seconds": times, "losses": losses, "threads": torch.get_num_threads(),
    }  # fmt: skip


def prediction(args) -> dict:
    from slimtune.memory import architecture_from_config, estimate
    from slimtune.train import TrainConfig

    arch = architecture_from_config(config(args.layers).to_dict(), name="llama-2-7b (random)")
    settings = TrainConfig(method="qlora", rank=args.rank, batch_size=1, max_length=args.length,
                           gradient_checkpointing=True, optimizer=args.optimizer,
                           compute_dtype="float32")  # fmt: skip
    out = estimate(arch, settings).to_dict()
    if args.embed_dtype == "bfloat16":  # `slimtune train` keeps them float32; this build may not
        saved = 2 * (arch.num_params() - arch.num_layers * arch.block_linear_params())
        out["weights_bytes"] -= saved
        out["total_bytes"] -= saved
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--optimizer", default="adamw8bit")
    parser.add_argument("--embed-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer", help="train this HF checkpoint with transformers+peft+bnb")
    parser.add_argument("--write-checkpoint", help="write a random bf16 checkpoint here and exit")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--heap", choices=["lean", "mmap", "glibc"], default="lean",
                        help="lean: glibc tunables as `slimtune train` sets them (default); "
                        "mmap: limit_heap_fragmentation(); glibc: the defaults")  # fmt: skip
    args = parser.parse_args()
    from slimtune.runtime.heap import limit_heap_fragmentation, reexec_with_lean_heap

    if args.heap == "lean":
        reexec_with_lean_heap([sys.executable, *sys.argv])  # returns once the tunables are set
    elif args.heap == "mmap":
        limit_heap_fragmentation()
    torch.set_num_threads(args.threads)
    if args.write_checkpoint:
        write_checkpoint(Path(args.write_checkpoint), args.layers)
        return 0
    result = run_peer(args) if args.peer else run_slimtune(args)
    result["predicted"] = prediction(args)
    result["heap"] = args.heap
    result["machine"] = machine_record()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
