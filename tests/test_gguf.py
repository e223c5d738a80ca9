"""prefopt.gguf: files written by the gguf package's GGUFWriter read back exactly;
hand-built corrupt files (cut anywhere, bad magic/version, absurd counts, dims,
lengths, offsets, types) raise ValueError naming the file and the problem."""
import struct

import gguf as ggufpy
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFValueType as VT

from prefopt.gguf import GGUFFile


# -- files written by gguf-py ---------------------------------------------------------------

def write_with_gguf_py(path, tensors, alignment=None):
    w = ggufpy.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", 0.25)
    w.add_bool("t.bool_t", True)
    w.add_bool("t.bool_f", False)
    w.add_string("t.str", "héllo ✓")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_array("t.arr_i", [1, -2, 3])
    w.add_array("t.arr_f", [0.5, 1.5])
    w.add_array("t.arr_s", ["a", "", "ccc"])
    w.add_array("t.arr_b", [True, False])
    w.add_key_value("t.arr_nested", [[1, 2], [3]], VT.ARRAY)
    for name, arr, qtype in tensors:
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, arr.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, ggufpy.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def some_tensors(rng):
    return [
        ("a.weight", rng.standard_normal((3, 64)).astype(np.float32), Q.F32),
        ("b.weight", rng.standard_normal((2, 3, 32)).astype(np.float32), Q.Q8_0),
        ("c.weight", rng.standard_normal((5, 32)).astype(np.float32), Q.Q4_1),
        ("d.bias", rng.standard_normal(7).astype(np.float32), Q.F16),
        ("e.weight", rng.standard_normal((2, 2, 2, 64)).astype(np.float32), Q.Q5_0),
    ]


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_gguf_py_file(tmp_path, alignment):
    path = tmp_path / "t.gguf"
    tensors = some_tensors(np.random.default_rng(0))
    write_with_gguf_py(path, tensors, alignment)
    g = GGUFFile(path)
    md = g.metadata
    assert g.version == 3 and g.alignment == (alignment or 32)
    assert md["general.architecture"] == "llama"
    assert md["t.u8"] == 200 and md["t.i8"] == -100 and md["t.u16"] == 60000
    assert md["t.i16"] == -30000 and md["t.u32"] == 4000000000 and md["t.i32"] == -2000000000
    assert md["t.f32"] == 0.25 and md["t.bool_t"] is True and md["t.bool_f"] is False
    assert md["t.str"] == "héllo ✓" and md["t.u64"] == 2**63 + 5 and md["t.i64"] == -(2**62)
    assert md["t.f64"] == 1e-300
    assert md["t.arr_i"] == [1, -2, 3] and md["t.arr_f"] == [0.5, 1.5]
    assert md["t.arr_s"] == ["a", "", "ccc"] and md["t.arr_b"] == [True, False]
    assert md["t.arr_nested"] == [[1, 2], [3]]
    assert all(type(v) in (int, float, bool, str, list) for v in md.values())
    assert g.value_types["t.u8"] == VT.UINT8 and g.value_types["t.arr_s"] == VT.ARRAY
    ref = ggufpy.GGUFReader(str(path))
    assert [t.name for t in ref.tensors] == list(g.tensors)
    for t in ref.tensors:
        info = g.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.offset == t.data_offset
        assert info.ne == tuple(int(x) for x in t.shape)
        expect = np.asarray(ggufpy.quants.dequantize(t.data, t.tensor_type), np.float32)
        got = g.tensor(t.name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.reshape(-1), expect.reshape(-1))
    for name, arr, qtype in tensors:
        assert g.tensor(name).shape == arr.shape    # PyTorch order = ne reversed
        if qtype == Q.F32:
            np.testing.assert_array_equal(g.tensor(name), arr)
    g.close()


# -- hand-built files for corruption tests --------------------------------------------------

def s(text):
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def build(kvs=None, tensors=None, data=None, magic=b"GGUF", version=3, n_tensors=None,
          n_kv=None, alignment=32):
    """GGUF bytes. tensors: list of (name, ne, ggml_type, offset). Returns (bytes, layout)."""
    kvs = kvs if kvs is not None else [kv("general.architecture", VT.STRING, s("llama"))]
    tensors = tensors if tensors is not None else [("w", (32, 2), int(Q.Q8_0), 0)]
    data = data if data is not None else bytes(range(68))
    head = magic + struct.pack("<IQQ", version,
                               len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    out = head + b"".join(kvs)
    infos_at = len(out)
    for name, ne, t, off in tensors:
        out += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        out += struct.pack("<IQ", t, off)
    pad = (-len(out)) % alignment
    layout = {"kv_at": len(head), "infos_at": infos_at, "data_at": len(out) + pad}
    return out + b"\0" * pad + data, layout


def good_file():
    # Q8_0 blocks with a finite scale (f16 0.5) so the data is a real tensor
    block = np.frombuffer(np.array([0.5], np.float16).tobytes(), np.uint8).tobytes() + bytes(range(32))
    kvs = [kv("general.architecture", VT.STRING, s("llama")),
           kv("x.n", VT.UINT32, struct.pack("<I", 7)),
           kv("x.arr", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2) + s("ab") + s("c"))]
    return build(kvs=kvs, data=block * 2)


def expect_error(tmp_path, data, match, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(ValueError) as ei:
        GGUFFile(p)
    msg = str(ei.value)
    assert str(p) in msg, msg
    if match:
        assert match in msg, msg
    return msg


def test_hand_built_file_is_valid(tmp_path):
    data, _ = good_file()
    p = tmp_path / "good.gguf"
    p.write_bytes(data)
    g = GGUFFile(p)
    assert g.metadata == {"general.architecture": "llama", "x.n": 7, "x.arr": ["ab", "c"]}
    np.testing.assert_array_equal(g.tensor("w"), 0.5 * np.tile(np.arange(32), 2).reshape(2, 32))
    r = ggufpy.GGUFReader(str(p))   # the independent reader agrees the file is well formed
    assert r.tensors[0].name == "w"


def test_truncated_anywhere(tmp_path):
    data, layout = good_file()
    for cut in range(len(data)):
        msg = expect_error(tmp_path, data[:cut], None, name=f"cut{cut}.gguf")
        assert ("truncated" in msg or "too short" in msg or "past the end" in msg
                or "cannot fit" in msg or "do not fit" in msg), (cut, msg)


def test_bad_magic_and_version(tmp_path):
    data, _ = good_file()
    expect_error(tmp_path, b"GGML" + data[4:], "not a GGUF file")
    expect_error(tmp_path, b"\0" * len(data), "not a GGUF file")
    for v in (0, 1, 4, 1000):
        expect_error(tmp_path, data[:4] + struct.pack("<I", v) + data[8:], f"unsupported GGUF version {v}")
    expect_error(tmp_path, data[:4] + struct.pack(">I", 3) + data[8:], "big-endian")


def test_absurd_counts(tmp_path):
    expect_error(tmp_path, build(n_kv=2**40)[0], "kv count")
    expect_error(tmp_path, build(n_kv=2**64 - 1)[0], "kv count")
    expect_error(tmp_path, build(n_tensors=2**63)[0], "tensor count")
    expect_error(tmp_path, build(n_kv=5)[0], None)      # more kvs claimed than present
    expect_error(tmp_path, build(n_tensors=3)[0], None)


def test_bad_strings_and_values(tmp_path):
    huge = struct.pack("<Q", 2**62)
    expect_error(tmp_path, build(kvs=[huge + b"key"])[0], "absurd length")
    expect_error(tmp_path, build(kvs=[struct.pack("<Q", 1000) + b"key"])[0], "truncated")
    expect_error(tmp_path, build(kvs=[kv("k", VT.STRING, struct.pack("<Q", 10**6) + b"x")])[0], "truncated")
    expect_error(tmp_path, build(kvs=[kv("k", 13, b"")])[0], "unknown value type 13")
    expect_error(tmp_path, build(kvs=[kv("k", 2**31, b"")])[0], "unknown value type")
    expect_error(tmp_path, build(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", 99, 1))])[0], "unknown element type 99")
    expect_error(tmp_path, build(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", VT.UINT32, 2**60))])[0], "do not fit")
    expect_error(tmp_path, build(kvs=[kv("k", VT.ARRAY, struct.pack("<IQ", VT.STRING, 2**40))])[0], "cannot fit")
    expect_error(tmp_path, build(kvs=[kv("k", VT.BOOL, b"\x02")])[0], "not 0 or 1")
    expect_error(tmp_path, build(kvs=[kv("k", VT.STRING, s(b"\xff\xfe"))])[0], "UTF-8")
    expect_error(tmp_path, build(kvs=[kv("k", VT.UINT8, b"\1"), kv("k", VT.UINT8, b"\1")])[0], "duplicate key")
    expect_error(tmp_path, build(kvs=[kv("", VT.UINT8, b"\1")])[0], "empty key")
    nested = struct.pack("<IQ", VT.ARRAY, 1)
    expect_error(tmp_path, build(kvs=[kv("k", VT.ARRAY, nested * 20)])[0], "nested deeper")
    for a in (0, 3, 48):
        expect_error(tmp_path, build(kvs=[kv("general.alignment", VT.UINT32, struct.pack("<I", a))])[0],
                     "general.alignment")
    expect_error(tmp_path, build(kvs=[kv("general.alignment", VT.UINT64, struct.pack("<Q", 32))])[0],
                 "general.alignment")


def test_bad_tensor_infos(tmp_path):
    q8 = int(Q.Q8_0)
    expect_error(tmp_path, build(tensors=[("w", (32, 2, 1, 1, 1), q8, 0)])[0], "n_dims 5")
    expect_error(tmp_path, build(tensors=[("w", (), q8, 0)])[0], "n_dims 0")
    expect_error(tmp_path, build(tensors=[("w", (32, 2**40), q8, 0)])[0], "absurd dims")
    expect_error(tmp_path, build(tensors=[("w", (32, 2**20, 2**12), q8, 0)])[0], "more than 2^31")
    expect_error(tmp_path, build(tensors=[("w", (32, 0), q8, 0)])[0], "absurd dims")
    expect_error(tmp_path, build(tensors=[("w", (33, 2), q8, 0)])[0], "not a multiple of the Q8_0 block size")
    expect_error(tmp_path, build(tensors=[("w", (256, 1), int(Q.Q5_K), 0)])[0], "Q5_K")
    expect_error(tmp_path, build(tensors=[("w", (32, 2), 77, 0)])[0], "unsupported ggml type")
    expect_error(tmp_path, build(tensors=[("w", (32, 2), q8, 32)])[0], "past the end")
    expect_error(tmp_path, build(tensors=[("w", (32, 2), q8, 2**63)])[0], "past the end")
    expect_error(tmp_path, build(tensors=[("w", (32, 2), q8, 8)])[0], "not a multiple of the alignment")
    expect_error(tmp_path, build(tensors=[("w", (32, 1), q8, 0), ("w", (32, 1), q8, 32)])[0], "duplicate tensor")
    expect_error(tmp_path, build(tensors=[("u", (32, 2), q8, 0), ("v", (32, 1), q8, 32)])[0], "overlap")
    expect_error(tmp_path, build(tensors=[(b"\xff", (32, 2), q8, 0)])[0], "UTF-8")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        GGUFFile(tmp_path / "nope.gguf")
    expect_error(tmp_path, b"", "too short")


def test_real_smollm2_header(smollm2_gguf):
    """Structure of the real file (its weights are checked against transformers in test_load)."""
    g = GGUFFile(smollm2_gguf)
    md = g.metadata
    assert g.version == 3 and g.alignment == 32 and md["general.architecture"] == "llama"
    assert len(g.tensors) == 272 and len(md["tokenizer.ggml.tokens"]) == 49152
    assert len(md["tokenizer.ggml.merges"]) == 48900 and md["tokenizer.ggml.pre"] == "smollm"
    assert g.value_types["llama.rope.freq_base"] == VT.FLOAT32 and md["llama.rope.freq_base"] == 100000.0
    types = {}
    for t in g.tensors.values():
        types[t.type_name] = types.get(t.type_name, 0) + 1
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert g.tensors["token_embd.weight"].shape == (49152, 576)
    end = max(t.offset + t.nbytes for t in g.tensors.values())
    assert end <= g.size and g.size - end < 32
    g.close()
