"""`slimtune export`: GGUF files checked with transformers' own GGUF reader (an independent
implementation) and the `gguf` package's reader and reference quantizers."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from helpers import (
    BPE_VOCAB,
    CHAT_TEMPLATE,
    hf_greedy,
    make_bpe_tokenizer,
    make_peft_adapter,
    make_tiny,
    make_tiny_gpt2,
    make_tiny_llama,
    save_tiny_model,
    trained_bpe,
    write_tiny_gguf,
)

from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.export import Survival, export_adapter_gguf, export_merged_gguf, gain_kept
from slimtune.export.ollama import chat_pieces, modelfile_text
from slimtune.export.to_gguf import load_gguf_model, merged_model

TEXTS = ["What is the answer?", "the lazy dog\njumps  over 42 foxes.", "<|im_start|>user\nhi"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "tiny"
    model = make_tiny_llama(vocab_size=BPE_VOCAB)
    tokenizer = make_bpe_tokenizer()
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = make_peft_adapter(
        make_tiny_llama(vocab_size=BPE_VOCAB), folder.parent / "lora", seed=5
    )
    return folder, adapter


# Per architecture, a tiny model llama.cpp's graph computes as transformers does: Gemma 3 with
# head_dim 256 and six layers (llama.cpp fixes its query scale and its layer pattern) and a
# window shorter than IDS; qwen2 with tied embeddings (llama is untied, gemma3 always tied).
EXPORT_ARCHS = {
    "llama": {},
    "qwen2": dict(tie_word_embeddings=True),
    "gemma3": dict(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4, layer_types=None),
}  # fmt: skip


def make_export_model(arch: str, seed: int = 0):
    """`make_tiny(arch)` over the BPE vocabulary, with random norm weights and biases: the
    initial ones (ones, zeros) would hide a missing Gemma 1 + w or a misplaced bias."""
    settings = dict(vocab_size=BPE_VOCAB, initializer_range=0.02, **EXPORT_ARCHS[arch])
    model = make_tiny(arch, seed, **settings)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


@pytest.fixture(scope="module", params=list(EXPORT_ARCHS))
def tuned(request, tmp_path_factory):
    """(architecture, base folder, PEFT adapter, slimtune's merged model) per architecture."""
    arch = request.param
    folder = tmp_path_factory.mktemp(arch) / "base"
    model = make_export_model(arch)
    tokenizer = make_bpe_tokenizer()
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = make_peft_adapter(make_export_model(arch), folder.parent / "lora", seed=5)
    with torch.no_grad():
        merged, _, _, _ = merged_model(folder, adapter)
    return arch, folder, adapter, merged


IDS = torch.tensor([[5, 40, 70, 6, 81, 69, 266, 79, 166, 7, 20, 33]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_float_gguf_reads_back_as_the_merged_model(tuned, tmp_path, qtype, one_thread):
    """transformers' GGUF reader gives back slimtune's merged model: the same logits (with the
    weights rounded as the file stores them) and the same greedy tokens."""
    import copy

    arch, folder, adapter, merged = tuned
    result = export_merged_gguf(folder, adapter, tmp_path / "m.gguf", qtype)
    n_layers = merged.config.num_hidden_layers
    assert result.merged_layers == 7 * n_layers and result.files == {"model": tmp_path / "m.gguf"}
    loaded = load_gguf_model(tmp_path / "m.gguf")
    assert loaded.config.model_type == merged.config.model_type
    stored = copy.deepcopy(merged)
    with torch.no_grad():
        for param in stored.parameters():
            if param.dim() == 2 and qtype == "f16":
                param.copy_(param.half().float())
    torch.testing.assert_close(_logits(loaded), _logits(stored), atol=1e-4, rtol=0)
    assert hf_greedy(loaded, IDS, 12) == hf_greedy(merged, IDS, 12)
    fields = _fields(tmp_path / "m.gguf")
    assert fields["general.architecture"] == arch and fields["general.type"] == "model"
    assert fields[f"{arch}.attention.head_count_kv"] == merged.config.num_key_value_heads
    assert fields[f"{arch}.block_count"] == n_layers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left


def _round_trip(weight: torch.Tensor, qtype) -> torch.Tensor:
    data = gguf.quants.quantize(weight.detach().float().numpy(), qtype)
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32))


def _rounded_as_stored(merged, qtype: str):
    """`merged` with every matrix rounded as the `qtype` export stores it, by gguf's reference
    quantizer (llama.cpp's converter): the embedding and output in Q8_0 under q4_0."""
    import copy

    T = gguf.GGMLQuantizationType
    rounded = copy.deepcopy(merged)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.dim() == 2:
                keep_q8 = qtype == "q4_0" and name in (
                    "model.embed_tokens.weight",
                    "lm_head.weight",
                )
                param.copy_(_round_trip(param, T.Q8_0 if keep_q8 else T[qtype.upper()]))
    return rounded


def test_quantized_gguf_holds_the_reference_quantization(tuned, tmp_path, one_thread):
    """Q8_0 and Q4_0 files hold exactly what gguf's reference quantizer makes of each merged
    matrix: read back, their logits are those of the merged model with its weights so rounded
    (the type's error, no more). That error grows with the type's step (Q4_0's is 16 times
    Q8_0's); on these tiny random models the logits are small and flat, so it is measured
    relative to Q8_0 rather than as a share of the logits."""
    _, folder, adapter, merged = tuned
    reference = _logits(merged)
    T = gguf.GGMLQuantizationType
    errors = {}
    for qtype in ("q8_0", "q4_0"):
        export_merged_gguf(folder, adapter, tmp_path / f"{qtype}.gguf", qtype)
        loaded = _logits(load_gguf_model(tmp_path / f"{qtype}.gguf"))
        expected = _logits(_rounded_as_stored(merged, qtype))
        torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)
        errors[qtype] = float((loaded - reference).norm() / reference.norm())
        reader = gguf.GGUFReader(str(tmp_path / f"{qtype}.gguf"))
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == T[qtype.upper()]
        assert types["output_norm.weight"] == T.F32 and types["token_embd.weight"] == T.Q8_0
    assert 0 < 4 * errors["q8_0"] < errors["q4_0"], errors


def test_tokenizer_and_chat_template_survive(base, tmp_path):
    from transformers import AutoTokenizer

    folder, adapter = base
    export_merged_gguf(folder, adapter, tmp_path / "m.gguf", "q8_0")
    original = AutoTokenizer.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS:
        assert loaded(text)["input_ids"] == original(text)["input_ids"]
    assert loaded.chat_template == original.chat_template == CHAT_TEMPLATE
    assert loaded.eos_token == "<|im_end|>"
    fields = _fields(tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == original.eos_token_id
    merges = json.loads(original.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]


def test_the_adapters_chat_template_goes_into_the_exports(tmp_path, one_thread):
    """A base without a template (Gemma 3 270M is one) trains with `--chat-template`, saved
    beside the adapter: the merged GGUF, the base GGUF written beside an adapter GGUF (where
    Ollama finds a template the Modelfile cannot state) and the merged folder carry it."""
    from transformers import AutoTokenizer

    from slimtune.export import merge_to_folder
    from slimtune.models.chat_templates import TEMPLATE_FILE, resolve_chat_template

    model, tokenizer = make_export_model("gemma3"), make_bpe_tokenizer()
    tokenizer.chat_template = None
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(model, tmp_path / "lora", seed=1)
    gemma = resolve_chat_template("gemma")
    (adapter / TEMPLATE_FILE).write_text(gemma)
    export_merged_gguf(tmp_path / "base", adapter, tmp_path / "m.gguf", "f32")
    assert _fields(tmp_path / "m.gguf")["tokenizer.chat_template"] == gemma
    result = export_adapter_gguf(tmp_path / "base", adapter, tmp_path / "out", "f32")
    assert _fields(result.files["base"])["tokenizer.chat_template"] == gemma
    merge_to_folder(tmp_path / "base", adapter, tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == gemma
    assert AutoTokenizer.from_pretrained(tmp_path / "base").chat_template is None


def test_a_gguf_base_keeps_its_tokenizer_keys(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    source = write_tiny_gguf(tmp_path / "base.gguf", make_tiny_llama(seed=2, vocab_size=32))
    adapter = make_peft_adapter(make_tiny_llama(vocab_size=32), tmp_path / "lora", seed=3)
    export_merged_gguf(source, adapter, tmp_path / "out" / "m.gguf", "f32")
    theirs, ours = _fields(source), _fields(tmp_path / "out" / "m.gguf")
    keys = sorted(k for k in theirs if k.startswith("tokenizer."))
    assert len(keys) >= 8 and keys == sorted(k for k in ours if k.startswith("tokenizer."))
    for key in keys:
        assert ours[key] == theirs[key], key
    merged, _, _, _ = merged_model(source, adapter)
    loaded = load_gguf_model(tmp_path / "out" / "m.gguf")
    ids = torch.arange(3, 20).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)


def _tensors(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(str(path))
    return {
        t.name: np.asarray(t.data, dtype=np.float32).reshape(t.data.shape) for t in reader.tensors
    }


def test_adapter_gguf_on_the_base_gguf_gives_the_merged_gguf(tuned, tmp_path):
    """What llama.cpp computes, W + alpha / r * B @ A on its own tensors (permuted, norms
    shifted), equals the merged export tensor for tensor; and the files carry llama.cpp's adapter
    keys."""
    arch, folder, adapter, merged = tuned
    result = export_adapter_gguf(folder, adapter, tmp_path / "out", "f32", base_qtype="f32")
    assert set(result.files) == {"base", "adapter", "modelfile"}
    export_merged_gguf(folder, adapter, tmp_path / "merged.gguf", "f32")
    fields = _fields(result.files["adapter"])
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == arch and fields["adapter.lora.alpha"] == 8.0
    base_t, lora_t, merged_t = (_tensors(p) for p in (result.files["base"], result.files["adapter"],
                                                       tmp_path / "merged.gguf"))  # fmt: skip
    assert len(lora_t) == 2 * 7 * merged.config.num_hidden_layers
    k_rows = merged.config.num_key_value_heads * merged.model.layers[0].self_attn.head_dim
    assert lora_t["blk.0.attn_q.weight.lora_a"].shape == (4, 64)  # r x in, as PEFT's lora_A
    assert lora_t["blk.0.attn_k.weight.lora_b"].shape == (k_rows, 4)  # out x r
    for name, weight in base_t.items():
        if name + ".lora_a" in lora_t:
            a, b = lora_t[name + ".lora_a"], lora_t[name + ".lora_b"]
            weight = weight + 8.0 / a.shape[0] * (b @ a)
        np.testing.assert_allclose(weight, merged_t[name], atol=1e-5, rtol=0)


def test_rslora_scale_is_folded_into_lora_b(tmp_path):
    from slimtune.export.gguf_archs import llama_permute
    from slimtune.lora import LoraConfig, inject_adapter, save_adapter

    folder = save_tiny_model(tmp_path / "tiny")
    model = inject_adapter(make_tiny_llama(), LoraConfig(r=4, alpha=6, use_rslora=True,
                                                         target_modules=["q_proj"]))  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_adapter(model, tmp_path / "rs")
    result = export_adapter_gguf(folder, tmp_path / "rs", tmp_path / "out", "f32", base_qtype="f32")
    fields, lora_t = _fields(result.files["adapter"]), _tensors(result.files["adapter"])
    layer = model.model.layers[1].self_attn.q_proj
    a, b = lora_t["blk.1.attn_q.weight.lora_a"], lora_t["blk.1.attn_q.weight.lora_b"]
    delta = fields["adapter.lora.alpha"] / a.shape[0] * (b @ a)  # llama.cpp's scale: alpha / r
    expected = 6 / 2 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)  # rsLoRA
    np.testing.assert_allclose(delta, llama_permute(expected.detach(), 4).numpy(), atol=1e-5)


def test_modelfile_template_renders_like_the_chat_template(base, tmp_path):
    from transformers import AutoTokenizer

    folder, adapter = base
    result = export_adapter_gguf(folder, adapter, tmp_path / "out", "f16")
    text = result.files["modelfile"].read_text()
    lines = text.splitlines()
    assert lines[0] == f"FROM {result.files['base'].resolve()}"
    assert lines[1] == f"ADAPTER {result.files['adapter'].resolve()}"
    assert 'TEMPLATE """{{ range $i, $m := .Messages }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]  # fmt: skip
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_pieces(tokenizer).render(messages) == expected


def test_default_system_turn_and_unusable_templates(base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base[0])
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}[SYS]default[/SYS]{% endif %}" + CHAT_TEMPLATE
    )
    pieces = chat_pieces(tokenizer)
    assert pieces.default_system == "[SYS]default[/SYS]"
    assert '{{ if and (eq $i 0) (ne $m.Role "system") }}[SYS]default[/SYS]{{ end }}' in (
        pieces.go_template()
    )
    tokenizer.chat_template = "{{ messages[-1]['content'] }}"  # only the last message
    text, problem = modelfile_text("/b.gguf", None, tokenizer)
    assert "TEMPLATE" not in text and "could not be turned" in problem
    assert text.startswith("FROM /b.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text


def test_survival_reports_and_warns():
    assert gain_kept(0.2, 0.6, 0.5) == pytest.approx(0.75)
    kept = Survival(base=0.2, tuned=0.6, exported=0.58, n=40, what="q4_0 GGUF")
    assert kept.kept == pytest.approx(0.95) and not kept.lost_too_much
    assert "kept by the q4_0 GGUF: 95.0%" in str(kept) and "WARNING" not in str(kept)
    lost = Survival(base=0.2, tuned=0.6, exported=0.4, n=40)
    assert lost.lost_too_much and "WARNING: the export lost 50.0%" in str(lost)
    assert "gained nothing" in str(Survival(0.5, 0.5, 0.5, 10))


def test_cli_export_with_eval_rows(base, tmp_path, capsys, one_thread):
    folder, adapter = base
    rows = tmp_path / "eval.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i}?", "completion": "the"}) + "\n"
                            for i in range(3)))  # fmt: skip
    out = tmp_path / "m.gguf"
    args = ["export", "--model", str(folder), "--adapter", str(adapter), "--output", str(out)]
    assert main([*args, "--type", "q4_0", "--eval", str(rows)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote model: {out}" in printed and "exact match on 3 rows" in printed
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    assert main(args) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "x.bin")]) == 2


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from slimtune.export.gguf import write_gguf

    with pytest.raises(
        SlimtuneError, match="GGUF export supports model types llama, qwen2, gemma3"
    ):
        write_gguf(make_tiny_gpt2(), None, tmp_path / "g.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_gemma3_norms_are_stored_as_one_plus_w(tmp_path):
    """llama.cpp multiplies by the stored norm weight, Gemma by 1 + w: its converter stores
    1 + w, read here with the `gguf` package alone (no transformers in between)."""
    from slimtune.export import write_gguf

    model = make_export_model("gemma3")
    write_gguf(model, make_bpe_tokenizer(), tmp_path / "g.gguf", "f32")
    stored = _tensors(tmp_path / "g.gguf")
    layer = model.model.layers[5]
    for gguf_name, norm in [("blk.5.attn_norm", layer.input_layernorm),
                            ("blk.5.attn_q_norm", layer.self_attn.q_norm),
                            ("blk.5.post_ffw_norm", layer.post_feedforward_layernorm),
                            ("output_norm", model.model.norm)]:  # fmt: skip
        np.testing.assert_allclose(stored[gguf_name + ".weight"], 1 + norm.weight.detach().numpy())
    assert "output.weight" not in stored  # tied: llama.cpp reads token_embd
    np.testing.assert_array_equal(
        stored["token_embd.weight"], model.model.embed_tokens.weight.detach().numpy()
    )  # unscaled: llama.cpp multiplies by sqrt(hidden) in its graph, as transformers does
    fields = _fields(tmp_path / "g.gguf")
    assert fields["gemma3.attention.sliding_window"] == 4
    assert fields["gemma3.attention.key_length"] == 256
    assert fields["gemma3.rope.freq_base"] == 1e6  # the global layers'; sliding ones use 10000


@pytest.mark.parametrize(
    "arch, overrides, problem",
    [
        ("gemma3", dict(layer_types=["sliding_attention", "full_attention"] * 3), "sixth"),
        ("gemma3", dict(query_pre_attn_scalar=128), r"1/sqrt\(256\)"),
        ("gemma3", dict(rope_parameters={"sliding_attention": {"rope_theta": 5e4},
                                         "full_attention": {"rope_theta": 1e6}}), "RoPE base"),
        ("gemma3", dict(final_logit_softcapping=30.0), "soft-capping"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "sliding"),
    ],
)  # fmt: skip
def test_settings_llama_cpp_would_run_differently_are_refused(arch, overrides, problem, tmp_path):
    from slimtune.export import write_gguf

    model = make_tiny(arch, **{**EXPORT_ARCHS[arch], **overrides})
    with pytest.raises(SlimtuneError, match=problem):
        write_gguf(model, make_bpe_tokenizer(), tmp_path / "g.gguf", "f32")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_smollm2_merged_f16_gguf(smollm2, tmp_path):
    """The real model: its GGUF tokenizer keys carried over, greedy tokens equal to slimtune's
    merged model (weights rounded to f16 as the file stores them)."""
    import copy

    from transformers import AutoTokenizer

    from slimtune.lora import LoraConfig, inject_adapter, save_adapter

    model, tokenizer = smollm2
    lora = inject_adapter(copy.deepcopy(model), LoraConfig(r=8, alpha=16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    save_adapter(lora, tmp_path / "lora")
    del lora
    export_merged_gguf(None, tmp_path / "lora", tmp_path / "m.gguf", "f16")
    merged, _, _, _ = merged_model(None, tmp_path / "lora")
    with torch.no_grad():
        for param in merged.parameters():
            param.copy_(param.half().float())
    loaded = load_gguf_model(tmp_path / "m.gguf")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}],
                                           tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        ours, theirs = merged.generate(ids, **kwargs), loaded.generate(ids, **kwargs)
        assert ours.tolist() == theirs.tolist()
        base = model.generate(ids, **kwargs)
    assert base.tolist() != ours.tolist()  # the adapter changed the answer
    read_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert read_back(prompt)["input_ids"] == ids[0].tolist()
    assert read_back.chat_template == tokenizer.chat_template


def turn_tokenizer(template: str, specials: list[str], bos_first: bool = False, **tokens):
    """A byte-level BPE with `specials` and chat template `template` (a built-in name);
    `bos_first`: it puts its BOS before every text, as Gemma's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from slimtune.models.chat_templates import resolve_chat_template

    core = trained_bpe(["the quick brown fox. What is 2+2?"] * 9, BPE_VOCAB, specials)
    if bos_first:
        bos = tokens["bos_token"]
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, core.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **tokens)
    tokenizer.chat_template = resolve_chat_template(template)
    return tokenizer


GEMMA_TOKENS = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                    additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])  # fmt: skip
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
]  # fmt: skip


@pytest.mark.parametrize("bos_first", [False, True])
def test_modelfile_for_gemmas_chat_template(bos_first):
    """Gemma's template runs a system message into the first user turn and calls the assistant
    `model`; the Modelfile states it, stops at the end of a turn, and leaves out the BOS that
    llama.cpp adds where the tokenizer does."""
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = turn_tokenizer("gemma", specials, bos_first, **GEMMA_TOKENS)
    pieces = chat_pieces(tokenizer)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        assert pieces.render(messages) == expected
    assert pieces.user_after_system == "" and pieces.system == (
        "<bos><start_of_turn>user\n",
        "\n\n",
    )
    text, problem = modelfile_text("/b.gguf", None, tokenizer)
    assert problem is None
    bos = "" if bos_first else "<bos>"
    template = (
        '{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role "system") }}'
        f'{bos}{{{{ end }}}}{{{{ if eq $m.Role "system" }}}}{bos}<start_of_turn>user\n'
        "{{ $m.Content }}\n\n{{ end }}"
        '{{ if eq $m.Role "user" }}{{ if and (eq $i 1) (eq (index $.Messages 0).Role "system") }}'
        "{{ else }}<start_of_turn>user\n{{ end }}{{ $m.Content }}<end_of_turn>\n{{ end }}"
        '{{ if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
        "{{ end }}{{ end }}<start_of_turn>model\n"
    )
    assert text == (
        f'FROM /b.gguf\nTEMPLATE """{template}"""\nPARAMETER stop "<eos>"\n'
        'PARAMETER stop "<end_of_turn>"\nPARAMETER stop "<start_of_turn>"\n'
    )


def test_modelfile_for_chatml():
    """ChatML (Qwen, SmolLM2): one wrapper per role, stops at <|im_end|> and <|im_start|>."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = turn_tokenizer("chatml", specials, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", bos_token="<|endoftext|>")  # fmt: skip
    pieces = chat_pieces(tokenizer)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
        assert pieces.render(messages) == expected
    assert pieces.user_after_system is None and pieces.default_system == ""
    text, problem = modelfile_text("/b.gguf", None, tokenizer)
    turn = '{{{{ if eq $m.Role "{0}" }}}}<|im_start|>{0}\n{{{{ $m.Content }}}}<|im_end|>\n{{{{ end }}}}'
    template = (
        '{{ range $i, $m := .Messages }}{{ if and (eq $i 0) (ne $m.Role "system") }}{{ end }}'
        + "".join(turn.format(role) for role in ("system", "user", "assistant"))
        + "{{ end }}<|im_start|>assistant\n"
    )
    assert problem is None
    assert text == (
        f'FROM /b.gguf\nTEMPLATE """{template}"""\nPARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop "<|im_start|>"\n'
    )
