"""What the tests share (no tests here): tiny models and model folders built in code, offline
tokenizers, PEFT twins of slimtune's LoRA models, training rows and configs, and the UI served to
a browser. The reference computations tests compare against are in oracles.py; fixtures in
conftest.py."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import string
import threading
import time
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
import transformers
from torch import nn

from slimtune.lora import LoraConfig, inject_adapter
from slimtune.models.experts import unfuse_experts
from slimtune.serve import GenerationRequest
from slimtune.train import TrainConfig, TrainData

# ------------------------------------------------------------------------------ tiny models

# Small enough for a unit test, with grouped KV heads, every dimension a multiple of the 64-value
# quantization block.
TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """A LLaMA-architecture causal LM of TINY_SHAPE (hidden 64, 2 layers), in eval mode."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_SHAPE, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


def make_tiny_gpt2(seed: int = 0) -> nn.Module:
    """A GPT-2 (Conv1D layers) causal LM for tests of the Conv1D path."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128
    )
    return transformers.GPT2LMHeadModel(config).eval()


# What every architecture below shares on top of TINY_SHAPE.
ARCHITECTURE_SETTINGS = dict(
    TINY_SHAPE,
    initializer_range=0.3,  # confident logits, so that a few steps visibly change them
    bos_token_id=1,
    eos_token_id=4,  # the char tokenizer's <|im_end|>
    pad_token_id=0,
)

# model_type -> (config class, model class, settings over ARCHITECTURE_SETTINGS), from
# transformers' names.
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # biased q/k/v
    # q/k norms, GELU-tanh gated MLP, sliding-window layers, one shared KV head, tied embeddings
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"],
            tie_word_embeddings=True,
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj and gate_up_proj
    # experts stored as 3-D parameters (gate_up_proj, down_proj), a top-2 router
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
        ),
    ),
}


def make_tiny(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny model of architecture `arch` (a key of ARCHITECTURES), random weights from `seed`."""
    config_name, model_name, settings = ARCHITECTURES[arch]
    values = {**ARCHITECTURE_SETTINGS, **settings, **overrides}
    config = getattr(transformers, config_name)(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    if arch == "qwen2_moe":
        # transformers starts the router at zero (all experts tie): give it a real choice.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.3)
    return model.eval()


def unfused(model: nn.Module) -> nn.Module:
    """`model` with its fused experts split into one layer each (slimtune's layout)."""
    unfuse_experts(model)
    return model


def ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    """Random token ids below 128 (every tiny model's vocabulary)."""
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`model`'s logits, without gradients, for `input_ids` (default: ids 3-19, one row)."""
    if input_ids is None:
        input_ids = torch.arange(3, 20).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids).logits


def hf_greedy(model: nn.Module, prompt: torch.Tensor, n: int) -> list[int]:
    """transformers' greedy generate: the next `n` token ids after `prompt` ([1, T]), no end
    token."""
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, prompt.shape[1] :].tolist()


# ------------------------------------------------------------------------------ tokenizers

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_letters + string.digits + " .,:;!?'\"-_\n()[]/+=*#"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer():
    """A tokenizer of single characters (vocab < 128), BOS added, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(set(CHARS)))}
    assert len(vocab) <= 128
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["</s>", "<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


SUM_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789+="


def char_tokenizer(chars: str = SUM_CHARS):
    """One token per character of `chars` after <pad> <s> </s> <unk> (ids 0-3), no template:
    small, offline, and exact to reason about."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = ["<pad>", "<s>", "</s>", "<unk>", *chars]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


WORDS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)]


def make_tiny_tokenizer():
    """A character-level tokenizer (29 tokens) with a chat template, for tiny model folders."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.pad_token = "</s>"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    return tokenizer


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A template that closes no turn: slimtune must append EOS itself.
OPEN_TURNS = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Write the date as YYYY-MM-DD. Invoice paid on March 5th, 2021. 2021-03-05",
    "Below is an instruction that describes a task. Write a response that completes it.",
    "system user assistant human gpt Instruction Input Response hello world answer question",
    "Translate to French: cheese and bread. fromage et pain. Count 1 2 3 4 5 6 7 8 9 0.",
]


def trained_bpe(texts: list[str], vocab_size: int, specials: list[str]):
    """A byte-level BPE (GPT-2 style, as SmolLM2's) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return core


@functools.cache
def _data_bpe() -> str:
    """The data tests' BPE as JSON, trained once."""
    return trained_bpe(CORPUS, 400, SPECIALS).to_str()


def make_tokenizer(chat_template: str | None = CHATML, eos: str = "<|im_end|>", bos: bool = False):
    """The data tests' tokenizer: byte-level BPE trained on CORPUS, ChatML; `bos=True` makes it
    put <s> before every text, as LLaMA's does."""
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(_data_bpe())
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token="<pad>", bos_token="<s>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


BPE_VOCAB = 300


def make_bpe_tokenizer():
    """The export tests' tokenizer: byte-level BPE of BPE_VOCAB tokens trained on a few
    sentences, with ChatML special tokens and chat template."""
    core = trained_bpe(
        ["the quick brown fox jumps over the lazy dog. What is 2+2?"] * 9,
        BPE_VOCAB,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ------------------------------------------------------------------------------ model folders


def save_tiny(arch: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """`make_tiny(arch)` plus the character tokenizer (ChatML template), as an HF folder."""
    model = make_tiny(arch, seed, **overrides)
    tokenizer = make_char_tokenizer()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """The tiny LLaMA plus the char tokenizer (ChatML), as an HF folder (safetensors)."""
    model = make_tiny_llama(seed, **overrides)
    tokenizer = make_char_tokenizer()
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_char_model(folder: Path, chars: str = SUM_CHARS, **overrides) -> Path:
    """A tiny LLaMA of 64 tokens with `char_tokenizer(chars)`, as an HF folder."""
    settings = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    make_tiny_llama(**{**settings, **overrides}).save_pretrained(folder)
    char_tokenizer(chars).save_pretrained(folder)
    return folder


def save_qlora_run(root: Path, trained: str) -> tuple[Path, Path]:
    """(model folder, adapter folder): a tiny 64-token LLaMA with large weights and the char
    tokenizer, and a LoRA adapter on all its linear layers (random B) whose config.yaml holds
    `trained`, as `slimtune train` writes it beside an adapter."""
    from slimtune.lora import save_adapter

    settings = dict(vocab_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = make_tiny_llama(initializer_range=0.3, **settings)
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    inject_adapter(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    save_adapter(model, root / "adapter")
    (root / "adapter" / "config.yaml").write_text(trained)
    return root / "model", root / "adapter"


def save_tiny_folder(folder: Path, model: nn.Module | None = None) -> Path:
    """A tiny LLaMA + `make_tiny_tokenizer()` saved as an HF folder; returns the folder."""
    model = model if model is not None else make_tiny_llama()
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def write_tiny_gguf(path: Path, model: nn.Module) -> Path:
    """A float32 GGUF of a tiny LLaMA, with a byte-level BPE tokenizer and a chat template."""
    import gguf
    import numpy as np

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    tokens = [*WORDS, " ", ".", "ab"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
    gguf_names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in gguf_names.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    for key, tensor in model.state_dict().items():
        value = tensor.numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        for proj, n_head in heads.items():
            if proj in key:  # llama.cpp stores q and k rows in its own rotary order
                shape = value.shape
                value = value.reshape(n_head, 2, shape[0] // n_head // 2, shape[1])
                value = value.swapaxes(1, 2).reshape(shape)
        writer.add_tensor(names[key], np.ascontiguousarray(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ PEFT twins

PEFT_PREFIX = "base_model.model."


def peft_config(config: LoraConfig, **extra) -> peft.LoraConfig:
    """PEFT's LoraConfig for slimtune's `config`."""
    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.target_modules,
        rank_pattern=config.rank_pattern,
        alpha_pattern=config.alpha_pattern,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        **extra,
    )


def copy_peft_weights(peft_model: nn.Module, ours: nn.Module) -> int:
    """Load PEFT's LoRA tensors into our model (same key names once PEFT's prefix is dropped)."""
    state = {
        k.removeprefix(PEFT_PREFIX): v for k, v in peft_model.state_dict().items() if "lora_" in k
    }
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return len(state)


def twins(make, config: LoraConfig, **peft_extra):
    """(base, PEFT model, our model) on the same base with the same, non-zero adapter weights."""
    base = make()
    extra = {"init_lora_weights": False, **peft_extra}  # B random: the adapter changes outputs
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config, **extra))
    ours = inject_adapter(copy.deepcopy(base), config)
    assert copy_peft_weights(theirs, ours) > 0
    return base, theirs, ours


def lora_grads(model: nn.Module, strip: str = "") -> dict[str, torch.Tensor]:
    return {
        n.removeprefix(strip): p.grad
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def bnb_quantize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Every block Linear -> bitsandbytes Linear4bit (NF4, double quantization), quantized by
    bitsandbytes on `device`."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=torch.float32,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(),
                    requires_grad=False,
                    quant_type="nf4",
                    compress_statistics=True,
                )
                setattr(module, name, layer.to(device))  # .to() quantizes
    model.is_loaded_in_4bit = True  # what PEFT looks at to wrap bitsandbytes layers
    return model


def make_peft_adapter(model: nn.Module, folder: Path, seed: int, r: int = 4) -> Path:
    """A PEFT LoRA adapter on all linear layers of `model`, with random (non-zero) B so that it
    changes the outputs. `model` is left untouched."""
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(folder)
    return folder


def peft_lora(model: nn.Module, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """PEFT's rank-8 adapter (alpha 16) on every linear layer of `model`, initialised from
    `seed`: a trainable model that stands in for any."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear")
    return peft.get_peft_model(model, config)


# ------------------------------------------------------------------------------ training

ANSWER = [17, 42, 99, 5, 64, 23]


def task_rows(n: int, seed: int = 0) -> list[dict]:
    """A random prompt of 2-5 tokens (masked) and then always the same six-token answer: a task
    a rank-8 adapter learns in a few steps, from ~ln(128) = 4.85 nats per token to near 0."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(
            3, 128, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g
        ).tolist()
        rows.append({"input_ids": prompt + ANSWER, "labels": [-100] * len(prompt) + ANSWER})
    return rows


def task_data() -> TrainData:
    """task_rows for training (48) and evaluation (8, another seed)."""
    return TrainData(train=task_rows(48), eval=task_rows(8, seed=1))


def adapter_twins(dropout: float, arch: str = "llama") -> tuple[nn.Module, nn.Module]:
    """A tiny model with a rank-4 adapter, B random (B = 0 would hide mistakes in A's
    gradient), and a deep copy of it; both in training mode."""
    torch.manual_seed(0)
    model = inject_adapter(make_tiny(arch), LoraConfig(r=4, alpha=8, dropout=dropout))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    return model.train(), copy.deepcopy(model).train()


def tiny_lora_model(seed: int = 0) -> nn.Module:
    # A larger init than the default 0.02: with it, the frozen random output layer can give
    # confident logits at all (else the loss cannot fall much below ~3.5 whatever LoRA does).
    return peft_lora(make_tiny_llama(initializer_range=0.3), seed, dropout=0.1)


def tiny_config(output, **overrides) -> TrainConfig:
    """A TrainConfig that learns task_rows on the tiny LLaMA in a few dozen steps."""
    settings = dict(
        output=str(output),
        rank=8,
        alpha=16,
        dropout=0.1,
        lr=1e-2,
        epochs=3,
        batch_size=4,
        grad_accum=2,
        max_grad_norm=1.0,
        warmup_steps=2,
        lr_scheduler="cosine",
        seed=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def sums(n: int = 40) -> list[dict]:
    """Completion rows "a+b=" -> "a+b" for a, b in 0..6, in order."""
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(7) for b in range(7)]
    return rows[:n]


# ------------------------------------------------------------------------------ serving

PROMPTS = ["Hello", "A much longer prompt, with commas", "x", "What is 2+2?", "ok", "zz top"]
ADAPTERS = [None, "a", "b", "a", None, "b"]


def generation_request(tokenizer, prompt: str, adapter: str | None, **kwargs) -> GenerationRequest:
    kwargs.setdefault("max_tokens", 8)
    return GenerationRequest(tokenizer(prompt)["input_ids"], adapter, **kwargs)


# ------------------------------------------------------------------------------ the UI in a browser

CHROMIUM = Path("/usr/bin/chromium")


@contextlib.contextmanager
def served(root: Path):
    """`slimtune ui` on 127.0.0.1 at a free port, from a thread; yields its address."""
    import uvicorn

    from slimtune.ui import Allowed, create_app

    app = create_app(Allowed([root]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the UI server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 860):
    """A page of Debian's chromium driven by Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


# Pixels of the chart's train-loss colour (#2f6fde) below the legend: none before a step is
# logged, more as the curve grows.
CHART_LINE_PIXELS = """() => {
  const c = document.getElementById('loss-chart');
  const top = Math.ceil(24 * (window.devicePixelRatio || 1));
  const d = c.getContext('2d').getImageData(0, top, c.width, c.height - top).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - 47) < 30 && Math.abs(d[i + 1] - 111) < 30 && Math.abs(d[i + 2] - 222) < 30) n++;
  return n;
}"""
