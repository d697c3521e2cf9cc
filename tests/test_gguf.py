"""GGUF LoRA adapters (llama.cpp): read, analysed, resized into GGUF, and refused when broken.

The files are written by gguf's own GGUFWriter as convert_lora_to_gguf.py writes them
(tests/helpers/gguf_adapters.py); every number is checked against float64 computed from the arrays
written, through an independent model of what each type stores.
"""

from __future__ import annotations

import json
import math
import struct

import gguf
import numpy as np
import pytest
from helpers.cli import run_cli
from helpers.gguf_adapters import llama_modules, stored, write_gguf_lora

import rankscope
from rankscope.cli import main as rankscope_main

ALPHA = 16.0
HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
      "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(gguf_name: str) -> str:
    _, block, kind, _ = gguf_name.split(".")
    return f"model.layers.{block}.{HF[kind]}"


def stored_A(name: str, A: np.ndarray, outtype: str) -> np.ndarray:
    """A as the file holds it: token_embd's lora_a is written transposed (vocab, r), and typed as such."""
    return stored(A.T, outtype).T if name == "token_embd.weight" else stored(A, outtype)


def dense(A: np.ndarray, B: np.ndarray, outtype: str, scale: float, name: str = "") -> np.ndarray:
    """ΔW in float64 from the values the file holds."""
    return scale * stored(B, outtype) @ stored_A(name, A, outtype)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_every_type_reads_the_stored_values_with_llamas_scale(tmp_path, outtype):
    modules = llama_modules(blocks=2, r=8)
    modules["token_embd.weight"] = (np.random.default_rng(5).normal(size=(8, 160)), np.random.default_rng(6).normal(size=(64, 8)))
    path = write_gguf_lora(tmp_path / "adapter.gguf", "llama", modules, ALPHA, outtype,
                           norms={"blk.0.attn_norm.weight": np.ones(64)})
    checkpoint = rankscope.load(path)
    assert checkpoint.format == "gguf" and checkpoint.skipped == ["blk.0.attn_norm.weight"]
    by_name = {m.name: m for m in checkpoint}
    assert set(by_name) == {hf_name(n) for n in modules if n != "token_embd.weight"} | {"model.embed_tokens"}
    document = rankscope.analyze(path, progress=False)
    spectra = {m["name"]: m["spectrum"] for m in document["snapshots"][0]["modules"]}
    for name, (A, B) in modules.items():
        module = by_name["model.embed_tokens" if name == "token_embd.weight" else hf_name(name)]
        assert module.rank == 8 and module.scale == ALPHA / 8
        assert (module.in_features, module.out_features) == (A.shape[1], B.shape[0])
        # Exactly the stored values (Q8_0: d·q block by block; bf16: rounded to nearest even), as float64.
        np.testing.assert_array_equal(np.asarray(module.A, np.float64), stored_A(name, A, outtype))
        np.testing.assert_array_equal(np.asarray(module.B, np.float64), stored(B, outtype))
        expected = np.linalg.svd(dense(A, B, outtype, ALPHA / 8, name), compute_uv=False)[:8]
        np.testing.assert_allclose(spectra[module.name], expected, rtol=1e-9, atol=1e-12 * expected[0])
    assert by_name["model.embed_tokens"].layer_type == "embedding"
    assert any("llama" in note and "model.layers.0.self_attn.q_proj" in note for note in checkpoint.notes)


def test_an_unknown_architecture_keeps_the_gguf_names_and_a_folder_finds_its_one_gguf(tmp_path):
    modules = {"blk.0.attn_q.weight": llama_modules(1)["blk.0.attn_q.weight"],
               "blk.1.mystery_proj.weight": llama_modules(1, seed=3)["blk.0.ffn_up.weight"]}
    write_gguf_lora(tmp_path / "folder" / "my-lora-f16.gguf", "notanarch", modules, 0.0, "f16")
    checkpoint = rankscope.load(tmp_path / "folder")
    assert [m.name for m in checkpoint] == ["blk.0.attn_q", "blk.1.mystery_proj"]
    assert [m.layer for m in checkpoint] == ["blk.0", "blk.1"] and checkpoint.modules[0].kind == "attn_q"
    assert all(m.scale == 1.0 for m in checkpoint)  # alpha 0: llama.cpp's scale is 1
    assert any("'notanarch'" in note for note in checkpoint.notes)
    assert any("scale 1" in note for note in checkpoint.notes)


def test_analyze_cli_json(tmp_path):
    modules = llama_modules(blocks=1, r=4)
    path = write_gguf_lora(tmp_path / "a.gguf", "llama", modules, 8.0, "bf16")
    done = run_cli("analyze", path, "--json", "-")
    assert done.returncode == 0, done.stderr
    snapshot = json.loads(done.stdout)["snapshots"][0]
    assert snapshot["format"] == "gguf" and len(snapshot["modules"]) == 7
    for entry in snapshot["modules"]:
        A, B = next(v for k, v in modules.items() if hf_name(k) == entry["name"])
        assert entry["rank"] == 4 and entry["scale"] == 2.0 and entry["dtype"] == "BF16"
        expected = np.linalg.svd(dense(A, B, "bf16", 2.0), compute_uv=False)[:4]
        np.testing.assert_allclose(entry["spectrum"], expected, rtol=1e-9)


def _truncated(delta: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta)
    return (u[:, :k] * s[:k]) @ vt[:k]


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_resize_writes_a_gguf_adapter_llama_cpp_accepts(tmp_path, outtype):
    modules = llama_modules(blocks=2, r=8, decay=0.5)
    rng = np.random.default_rng(9)
    modules["token_embd.weight"] = (rng.normal(size=(8, 96)) * 0.6 ** np.arange(8)[:, None], rng.normal(size=(64, 8)))
    source = write_gguf_lora(tmp_path / "in" / "lora.gguf", "llama", modules, ALPHA, outtype)
    before = gguf.GGUFReader(source)
    result = rankscope.adapters.resize.resize(source, tmp_path / "out", energy=0.9)
    ranks = {m.name: m.rank_after for m in result.modules}
    assert len(set(ranks.values())) > 1  # per-module ranks: the case one file-wide alpha cannot express alone
    written = tmp_path / "out" / "lora.gguf"
    reader = gguf.GGUFReader(written)
    # Every key/value field kept, with its value and type (file_type follows Q8_0 -> F16).
    fields = {k: (f.contents(), f.types) for k, f in before.fields.items() if not k.startswith("GGUF.")}
    after = {k: (f.contents(), f.types) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if outtype == "q8_0":
        assert after.pop("general.file_type")[0] == gguf.LlamaFileType.MOSTLY_F16
        fields.pop("general.file_type")
    assert after == fields and after["adapter.lora.alpha"][0] == ALPHA
    tensors = {t.name: t for t in reader.tensors}
    assert [t.name for t in reader.tensors] == [t.name for t in before.tensors]
    for name, (A, B) in modules.items():
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        embedding = name == "token_embd.weight"
        k = ranks["model.embed_tokens" if embedding else hf_name(name)]
        a_data, b_data = np.asarray(a.data, np.float64), np.asarray(b.data, np.float64)
        assert a.tensor_type.name == b.tensor_type.name == ("F32" if outtype == "f32" else "F16")
        # llama.cpp's loader rules, in ggml's order (ne): a [in, k] and b [k, out], a's ne[1] == b's ne[0]; for
        # token_embd, b [k, embd] and a [k, vocab] (its lora_a transposed).
        if embedding:
            assert list(a.shape) == [k, A.shape[1]] and list(b.shape) == [k, B.shape[0]]
            a_data = a_data.T
        else:
            assert list(a.shape) == [A.shape[1], k] and list(b.shape) == [k, B.shape[0]]
        # llama.cpp applies (alpha / b's ne[0]) · B A: exactly the truncated SVD of the original update.
        applied = ALPHA / int(b.shape[0]) * b_data @ a_data
        target = _truncated(dense(A, B, outtype, ALPHA / 8, name), k)
        tolerance = 1e-5 if outtype == "f32" else 2e-3
        assert np.linalg.norm(applied - target) <= tolerance * np.linalg.norm(target), name
    reread = rankscope.load(written)
    assert {m.name: (m.rank, m.scale) for m in reread} == {n: (k, ALPHA / k) for n, k in ranks.items()}
    assert not [p.name for p in (tmp_path / "in").iterdir() if p.name != "lora.gguf"]


def test_suggest_speaks_peft_for_a_gguf_adapter(tmp_path, capfd):
    path = write_gguf_lora(tmp_path / "a.gguf", "llama", llama_modules(1, r=4, decay=0.3), ALPHA)
    rankscope_main(["suggest", str(path)])  # returns on success (an error would exit 2)
    out = capfd.readouterr().out
    assert "LoraConfig(" in out and "model.layers.0." in out
    assert "rankscope resize" in out and "GGUF" in out


def _patch(path, data: bytes, at: int, value: bytes) -> None:
    data = bytearray(data)
    data[at:at + len(value)] = value
    path.write_bytes(bytes(data))


def _tensor_info_at(data: bytes, name: str) -> int:
    """Byte position of a tensor info's n_dims field (just after its name)."""
    return data.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)


def bad_files(tmp_path) -> dict[str, tuple]:
    modules = llama_modules(blocks=1, r=4)
    good = write_gguf_lora(tmp_path / "good.gguf", "llama", modules, ALPHA, "f32")
    data = good.read_bytes()
    cases = {}
    second = "blk.0.attn_k.weight.lora_a"
    at = _tensor_info_at(data, second) + 4 + 2 * 8 + 4  # n_dims, 2 dims, type: then the offset
    _patch(tmp_path / "offset.gguf", data, at, struct.pack("<Q", struct.unpack_from("<Q", data, at)[0] + 32))
    cases["offset.gguf"] = "says its data begins at byte"
    (tmp_path / "truncated.gguf").write_bytes(data[:-100])
    cases["truncated.gguf"] = "is truncated"
    (tmp_path / "header-cut.gguf").write_bytes(data[:200])
    cases["header-cut.gguf"] = "truncated"
    _patch(tmp_path / "type99.gguf", data, _tensor_info_at(data, second) + 4 + 2 * 8, struct.pack("<I", 99))
    cases["type99.gguf"] = "type 99, which is not a ggml tensor type"
    q4 = gguf.GGUFWriter(tmp_path / "q4.gguf", "llama")
    q4.add_type("adapter"); q4.add_string("adapter.type", "lora"); q4.add_float32("adapter.lora.alpha", 8.0)  # noqa: E702
    A, B = modules["blk.0.attn_q.weight"]
    q4.add_tensor("blk.0.attn_q.weight.lora_a", gguf.quants.quantize(A.astype(np.float32), gguf.GGMLQuantizationType.Q4_0),
                  raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    q4.add_tensor("blk.0.attn_q.weight.lora_b", B.astype(np.float32))
    q4.write_header_to_file(); q4.write_kv_data_to_file(); q4.write_tensors_to_file(); q4.close()  # noqa: E702
    cases["q4.gguf"] = "stored as Q4_0, which rankscope does not read"
    _patch(tmp_path / "count.gguf", data, 16, struct.pack("<Q", 2**40))  # the key/value count
    cases["count.gguf"] = "key/value fields, more than a"
    (tmp_path / "lfs.gguf").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    cases["lfs.gguf"] = "is a Git LFS pointer file"
    deep = struct.pack("<Q", 6) + b"x.deep" + struct.pack("<I", 9) + (struct.pack("<I", 9) + struct.pack("<Q", 1)) * 5000
    (tmp_path / "deep.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + deep + struct.pack("<IQI", 4, 1, 7))
    cases["deep.gguf"] = "RecursionError"  # arrays of arrays 5000 deep: gguf's reader recurses
    write_gguf_lora(tmp_path / "model.gguf", "llama", modules, ALPHA, "f32", general_type="model")
    cases["model.gguf"] = "general.type 'model' (a model, not an adapter)"
    return cases


def test_broken_gguf_files_are_one_error_line_exit_2_and_nothing_written(tmp_path, capfd):
    for name, expected in bad_files(tmp_path).items():
        for command in (["analyze", str(tmp_path / name)],
                        ["resize", str(tmp_path / name), "--out", str(tmp_path / f"out-{name}"), "--rank", "2"]):
            with pytest.raises(SystemExit) as exit_:
                rankscope_main(command)
            captured = capfd.readouterr()
            assert exit_.value.code == 2 and captured.out == "", (name, captured)
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], (name, lines)
            assert not (tmp_path / f"out-{name}").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left behind


def test_forced_formats_across_gguf_and_safetensors(tmp_path):
    path = write_gguf_lora(tmp_path / "a.gguf", "llama", llama_modules(1, r=2), ALPHA)
    assert rankscope.load(path, format="gguf").format == "gguf"
    with pytest.raises(rankscope.RankscopeError, match="its format is gguf, not peft"):
        rankscope.load(path, format="peft")
    from helpers.adapters import write_peft

    A, B = llama_modules(1, r=2)["blk.0.attn_q.weight"]
    folder = write_peft(tmp_path / "peft", {"model.layers.0.self_attn.q_proj": (A.astype(np.float32), B.astype(np.float32))},
                        r=2, alpha=4)
    with pytest.raises(rankscope.RankscopeError, match="is not a GGUF file"):
        rankscope.load(folder, format="gguf")
    assert math.isclose(rankscope.load(folder).modules[0].scale, 2.0)


def test_a_gguf_file_cut_short_while_it_is_read_is_one_error(tmp_path):
    path = write_gguf_lora(tmp_path / "a.gguf", "llama", llama_modules(1, r=4), ALPHA, "f16")
    checkpoint = rankscope.load(path)  # header read; tensors not yet
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 64)
    with pytest.raises(rankscope.RankscopeError, match="changed while it was read"):
        for module in checkpoint:
            module.A, module.B


def test_validate_is_refused_for_a_gguf_adapter_before_anything_is_written(tmp_path, capfd):
    path = write_gguf_lora(tmp_path / "a.gguf", "llama", llama_modules(1, r=4), ALPHA)
    with pytest.raises(SystemExit) as exit_:
        rankscope_main(["resize", str(path), "--out", str(tmp_path / "out"), "--rank", "2", "--validate",
                        "--model", "minilm"])
    err = capfd.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "llama.cpp" in err[0] and not (tmp_path / "out").exists()
