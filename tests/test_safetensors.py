"""prefopt.safetensors_io: checkpoints saved by transformers (float32, bf16, sharded)
read back identical to the model's state dict; corrupt headers raise ValueError
naming the file and the problem."""
import json
import struct

import numpy as np
import pytest
import torch
import transformers

from prefopt.safetensors_io import SafetensorsCheckpoint, SafetensorsFile

torch.set_num_threads(1)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("dtype,shard", [(torch.float32, None), (torch.bfloat16, None),
                                          (torch.float16, None), (torch.float32, "20KB")])
def test_transformers_checkpoint_roundtrip(tmp_path, dtype, shard):
    model = tiny_llama().to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ckpt = SafetensorsCheckpoint(tmp_path)
    sd = model.state_dict()
    assert set(ckpt.names) == set(sd)
    for name, t in sd.items():
        got = ckpt.tensor(name)
        assert got.dtype == np.float32 and got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got, t.float().numpy())   # exact: widening is lossless
    ckpt.close()


# -- corrupt files ---------------------------------------------------------------------------

def make(header: dict, data: bytes, pad_to=8):
    h = json.dumps(header).encode()
    h += b" " * ((-len(h)) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


def good():
    x = np.arange(6, dtype=np.float32)
    y = np.arange(4, dtype=np.float16)
    header = {"__metadata__": {"format": "pt"},
              "x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "y": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}}
    return header, x.tobytes() + y.tobytes()


def expect_error(tmp_path, blob, match, name="bad.safetensors"):
    p = tmp_path / name
    p.write_bytes(blob)
    with pytest.raises(ValueError) as ei:
        f = SafetensorsFile(p)
        for n in f.entries:
            f.tensor(n)
    msg = str(ei.value)
    assert str(p) in msg, msg
    if match:
        assert match in msg, msg
    return msg


def test_good_file(tmp_path):
    header, data = good()
    p = tmp_path / "ok.safetensors"
    p.write_bytes(make(header, data))
    f = SafetensorsFile(p)
    np.testing.assert_array_equal(f.tensor("x"), np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(f.tensor("y"), np.arange(4, dtype=np.float32))
    assert f.metadata == {"format": "pt"}
    import safetensors.numpy   # the reference reader agrees
    ref = safetensors.numpy.load_file(str(p))
    np.testing.assert_array_equal(ref["x"], f.tensor("x"))


def test_truncated_anywhere(tmp_path):
    header, data = good()
    blob = make(header, data)
    for cut in range(len(blob)):
        expect_error(tmp_path, blob[:cut], None, name=f"cut{cut}.safetensors")


def test_bad_headers(tmp_path):
    header, data = good()
    blob = make(header, data)
    expect_error(tmp_path, struct.pack("<Q", 10**6) + blob[8:], "runs past the end")
    expect_error(tmp_path, struct.pack("<Q", 2**63) + blob[8:], "exceeds")
    expect_error(tmp_path, blob[:8] + b"{bad json" + blob[17:], "not valid JSON")
    expect_error(tmp_path, blob[:8] + b"\xff" + blob[9:], "not valid JSON")
    expect_error(tmp_path, make([1, 2], b""), "expected an object")

    def variant(name, **changes):
        h = json.loads(json.dumps(header))
        h["x"].update(changes)
        return make(h, data)

    expect_error(tmp_path, variant("x", data_offsets=[0, 40]), "outside the data buffer")
    expect_error(tmp_path, variant("x", data_offsets=[-8, 16]), "outside the data buffer")
    expect_error(tmp_path, variant("x", data_offsets=[16, 8]), "outside the data buffer")
    expect_error(tmp_path, variant("x", data_offsets=[0]), "bad data_offsets")
    expect_error(tmp_path, variant("x", data_offsets=[0, 24.0]), "bad data_offsets")
    expect_error(tmp_path, variant("x", shape=[3, 3]), "needs 36 bytes")
    expect_error(tmp_path, variant("x", shape=[2, -3]), "bad shape")
    expect_error(tmp_path, variant("x", shape="2x3"), "bad shape")
    expect_error(tmp_path, variant("x", shape=[2**50, 2**50]), "bad shape")
    expect_error(tmp_path, variant("x", dtype="F33"), "unknown dtype 'F33'")
    expect_error(tmp_path, variant("x", dtype="I32"), "dtype I32")
    expect_error(tmp_path, variant("x", dtype="I16", shape=[2, 6]), "dtype I16")
    expect_error(tmp_path, variant("x", data_offsets=[8, 32]), "overlap")
    h = json.loads(json.dumps(header))
    h["x"] = [1]
    expect_error(tmp_path, make(h, data), "not an object")
    expect_error(tmp_path, b"\1\2\3", "too short")
    dup = blob[8:8 + struct.unpack("<Q", blob[:8])[0]].decode().rstrip()
    dup = dup[:-1] + ', "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    expect_error(tmp_path, struct.pack("<Q", len(dup)) + dup.encode() + data, "duplicate key 'x'")


def test_bad_index(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    good_index = index.read_text()
    index.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SafetensorsCheckpoint(tmp_path)
    idx = json.loads(good_index)
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "../evil.safetensors"
    index.write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="bad shard file name"):
        SafetensorsCheckpoint(tmp_path)
    idx = json.loads(good_index)
    shards = sorted(set(idx["weight_map"].values()))
    wrong = next(n for n, sh in idx["weight_map"].items() if sh == shards[0])
    idx["weight_map"][wrong] = shards[1]
    index.write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="does not contain it"):
        SafetensorsCheckpoint(tmp_path)
    index.write_text(good_index)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SafetensorsCheckpoint(tmp_path / "missing")
