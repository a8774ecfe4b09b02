"""Error-compensated (GPTQ) NF4 rounding of merged weights: smaller output error than plain
rounding, the same scales and layout as bitsandbytes, loaded by transformers + bitsandbytes."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch
from helpers import make_bpe_tokenizer, make_peft_adapter, make_tiny_llama, save_tiny_model
from oracles import assert_close_to_bnb
from torch import nn
from transformers import AutoModelForCausalLM

from slimtune.cli import main
from slimtune.export import merge_to_folder
from slimtune.export.gptq import gptq_linear4bit, input_hessians
from slimtune.quant import Linear4bit, QuantConfig


def _correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Rows near one fixed 16-dimensional subspace (as a layer's inputs are), new draws per seed."""
    basis = torch.randn(16, dim, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=generator) @ basis + 0.1 * torch.randn(
        n, dim, generator=generator
    )


@pytest.mark.parametrize("double_quant", [True, False])
def test_gptq_layer_has_smaller_output_error_and_bitsandbytes_scales(double_quant, one_thread):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    x = _correlated_inputs(1500, 256, seed=1)
    config = QuantConfig(double_quant=double_quant)
    gptq = gptq_linear4bit(linear, x.t() @ x, config)
    plain = Linear4bit.from_linear(linear, config)
    held_out = _correlated_inputs(500, 256, seed=2)
    with torch.no_grad():
        reference = linear(held_out)
        gptq_error = (gptq(held_out) - reference).norm() / reference.norm()
        plain_error = (plain(held_out) - reference).norm() / reference.norm()
    assert gptq_error < 0.5 * plain_error
    # The scales are the ones plain rounding (and bitsandbytes) picks; only the codes differ.
    state, plain_state = gptq.quant_state, plain.quant_state
    assert torch.equal(state.absmax, plain_state.absmax)
    assert not torch.equal(gptq.weight, plain.weight)
    # bitsandbytes decodes the packed codes to the same weight as slimtune.
    _, bnb_state = bnbf.quantize_4bit(linear.weight.detach(), quant_type="nf4", blocksize=64,
                                      compress_statistics=double_quant)  # fmt: skip
    torch.testing.assert_close(bnb_state.absmax, state.absmax, atol=0, rtol=0)
    decoded = bnbf.dequantize_4bit(gptq.weight, bnb_state)
    torch.testing.assert_close(decoded, gptq.dequantize().float(), atol=0, rtol=0)


def test_hessians_sum_the_outer_products_of_layer_inputs():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    batches = [torch.randn(1, 5, 8), torch.randn(1, 3, 8)]
    hessians = input_hessians(model, ["0", "2"], batches)
    x = torch.cat([b.reshape(-1, 8) for b in batches])
    torch.testing.assert_close(hessians["0"], x.t() @ x)
    hidden = torch.relu(model[0](x))
    torch.testing.assert_close(hessians["2"], hidden.t() @ hidden, atol=1e-5, rtol=1e-5)


ROWS = [{"prompt": f"Add {i} and {i + 1}.", "completion": f"It is {2 * i + 1}."} for i in range(24)]


def test_gptq_merge_folder_loads_in_transformers_and_bitsandbytes(tmp_path, one_thread):
    folder = save_tiny_model(tmp_path / "tiny")
    adapter = make_peft_adapter(make_tiny_llama(), tmp_path / "lora", seed=5)
    report = merge_to_folder(folder, adapter, tmp_path / "gptq", quantize="nf4", calibration=ROWS)
    assert report.quantized and 0 < report.requant_rel_error < 0.3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq").eval()
    from slimtune.models import load_model

    ours, _ = load_model(tmp_path / "gptq")
    ids = torch.tensor([[1, 40, 70, 6, 81, 69, 66, 79, 66, 7, 20, 33]])
    with torch.no_grad():
        ours_logits = ours(ids).logits
    assert_close_to_bnb(ours_logits, loaded, lambda: loaded(ids).logits, atol=1e-4, rtol=1e-4)


def test_cli_merge_with_calibration(tmp_path, capsys):
    import json

    folder = save_tiny_model(tmp_path / "tiny")
    adapter = make_peft_adapter(make_tiny_llama(), tmp_path / "lora", seed=5)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    args = ["merge", "--model", str(folder), "--adapter", str(adapter), "--output"]
    assert main([*args, str(tmp_path / "o"), "--quantize", "nf4", "--calibration", str(data)]) == 0
    assert "re-quantized to NF4" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "p"), "--calibration", str(data)]) == 2
    assert "needs --quantize nf4" in capsys.readouterr().err


GGUF_TYPES = ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"]
# Where each block type keeps its scales (and mins): every byte that is not a code.
SCALE_BYTES = {"Q4_0": slice(0, 2), "Q5_0": slice(0, 2), "Q8_0": slice(0, 2),
               "Q4_K": slice(0, 16), "Q6_K": slice(192, 210)}  # fmt: skip


def _gguf_blocks(weight: torch.Tensor, name: str):
    import gguf

    from slimtune.export.gguf import encode

    return encode(weight.numpy(), gguf.GGMLQuantizationType[name])


def _decoded(blocks, name: str, shape) -> torch.Tensor:
    import gguf
    import numpy as np

    decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.asarray(decoded, np.float32).reshape(shape))


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_codes_written_into_gguf_blocks_decode_on_their_groups_grid(name):
    """`with_codes` puts each code where the type's decoder reads it: random codes decode to
    low + step * code of their group, and the quantizer's own codes, read back and written
    again, give the quantizer's bytes."""
    import gguf
    import numpy as np

    from slimtune.export.gguf_codes import LAYOUTS, code_grid, with_codes

    ggml_type = gguf.GGMLQuantizationType[name]
    layout = LAYOUTS[ggml_type]
    weight = torch.randn(8, 512, generator=torch.Generator().manual_seed(3)) * 0.05
    blocks = _gguf_blocks(weight, name)
    low, step = (np.repeat(a, layout.group, axis=1) for a in code_grid(blocks, ggml_type, (8, 512)))
    codes = np.random.default_rng(0).integers(0, layout.top + 1, (8, 512)).astype(np.uint8)
    decoded = _decoded(with_codes(blocks, codes, ggml_type), name, (8, 512)).numpy()
    np.testing.assert_allclose(decoded, low + step * codes, rtol=1e-6, atol=1e-9)
    own = np.round((_decoded(blocks, name, (8, 512)).numpy() - low) / step).astype(np.uint8)
    assert own.max() <= layout.top
    np.testing.assert_array_equal(with_codes(blocks, own, ggml_type), blocks)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_gguf_gptq_keeps_the_quantizers_scales_and_beats_plain_rounding(name, one_thread):
    """GPTQ's blocks keep every scale byte of llama.cpp's quantizer (the `gguf` reference's for
    Q4_0/Q5_0/Q8_0, slimtune's byte-exact port for Q4_K/Q6_K) and change only codes; decoded by
    the `gguf` package, their outputs on new inputs are less than half as far from the float
    layer's as plain rounding's."""
    import gguf

    from slimtune.export.gptq import gguf_gptq_codes

    torch.manual_seed(0)
    weight = torch.randn(96, 512) * 0.05
    x = _correlated_inputs(1500, 512, seed=1)
    plain = _gguf_blocks(weight, name)
    data = gguf_gptq_codes(weight, x.t() @ x, plain, gguf.GGMLQuantizationType[name])
    assert data.shape == plain.shape and data.dtype == plain.dtype
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]
    ours, theirs = data.reshape(-1, block_bytes), plain.reshape(-1, block_bytes)
    assert (ours[:, SCALE_BYTES[name]] == theirs[:, SCALE_BYTES[name]]).all()
    assert (ours != theirs).any()
    held_out = _correlated_inputs(500, 512, seed=2)
    target = held_out @ weight.t()

    def error(blocks) -> float:
        decoded = _decoded(blocks, name, weight.shape)
        return float((held_out @ decoded.t() - target).norm() / target.norm())

    assert error(data) < 0.5 * error(plain), (error(data), error(plain))


def test_q4_0_gguf_export_with_calibration(tmp_path, one_thread):
    from slimtune.export import export_merged_gguf
    from slimtune.export.to_gguf import load_gguf_model, merged_model

    folder = tmp_path / "tiny"
    make_tiny_llama(vocab_size=300).save_pretrained(folder)
    make_bpe_tokenizer().save_pretrained(folder)
    adapter = make_peft_adapter(make_tiny_llama(vocab_size=300), tmp_path / "lora", seed=5)
    plain = export_merged_gguf(folder, adapter, tmp_path / "plain.gguf", "q4_0")
    gptq = export_merged_gguf(folder, adapter, tmp_path / "gptq.gguf", "q4_0", calibration=ROWS)
    merged, tokenizer, _, _ = merged_model(folder, adapter)
    ids = tokenizer("Add 30 and 31. It is 61.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = merged(ids).logits
        errors = [float((load_gguf_model(r.files["model"])(ids).logits - reference).norm())
                  for r in (plain, gptq)]  # fmt: skip
    assert errors[1] < errors[0]
    with pytest.raises(Exception, match="do not apply to q8_0"):
        export_merged_gguf(folder, adapter, tmp_path / "x.gguf", "q8_0", calibration=ROWS)
