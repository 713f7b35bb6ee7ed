#!/usr/bin/env python3
"""Writes the seed corpus under fuzz/corpus/<target>/: tiny valid and hostile inputs (< 4 KiB).

Run from anywhere: python3 fuzz/gen_corpus.py. Needs only the Python standard library.
"""
import io
import json
import os
import struct
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    assert len(data) < 4096, (target, name, len(data))
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- safetensors -----------------------------------------------------------------------------
def safetensors(tensors, metadata=None):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


put("safetensors", "valid", safetensors(
    {"w": ("F32", [2, 3], bytes(24)), "b": ("BF16", [3], bytes(6))}, {"format": "pt"}))
put("safetensors", "length_u64_max", struct.pack("<Q", 2**64 - 1) + b'{"w":{"dtype":"F32"}}')
put("safetensors", "offsets_past_end",
    safetensors({"w": ("F32", [4], bytes(16))})[:-8])


# --- GGUF ------------------------------------------------------------------------------------
def gstr(s):
    return struct.pack("<Q", len(s)) + s


def gguf(kvs, tensors=(), version=3, kv_count=None):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs) if kv_count is None else kv_count)
    for kv in kvs:
        out += kv
    offset = 0
    for name, dims, ty, size in tensors:
        out += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, offset)
        offset += size + (-size % 32)
    if tensors:
        out += bytes(-len(out) % 32) + bytes(offset)
    return out


def kv_str(k, v):
    return gstr(k) + struct.pack("<I", 8) + gstr(v)


def kv_u32(k, v):
    return gstr(k) + struct.pack("<II", 4, v)


def kv_strs(k, vs):
    return gstr(k) + struct.pack("<IIQ", 9, 8, len(vs)) + b"".join(gstr(v) for v in vs)


put("gguf", "valid_v3", gguf(
    [kv_str(b"general.architecture", b"llama"), kv_str(b"general.name", b"Tiny"),
     kv_u32(b"general.file_type", 7), kv_strs(b"tokenizer.ggml.tokens", [b"<s>", b"</s>", b"hi"])],
    [(b"token_embd.weight", [32, 2], 8, 68), (b"output_norm.weight", [32], 0, 128)]))
put("gguf", "kv_count_2_63", gguf([kv_str(b"general.name", b"x")], kv_count=2**63))
nested = gstr(b"deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5 + struct.pack("<IQ", 0, 1) + b"\x07"
put("gguf", "nested_arrays", gguf([nested]))


# --- PyTorch zip / TorchScript ---------------------------------------------------------------
DATA_PKL = (b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02ctorch._utils\n"
            b"_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05"
            b"X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K\x06tq\x08QK\x00K\x02K\x03\x86q\tK\x03"
            b"K\x01\x86q\n\x89h\x00)Rq\x0btq\x0cRq\rs.")


def stored_zip(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


checkpoint = stored_zip([("archive/data.pkl", DATA_PKL), ("archive/data/0", bytes(24)),
                         ("archive/version", b"3\n")])
put("pytorch_zip", "checkpoint", checkpoint)
put("pytorch_zip", "torchscript", stored_zip(
    [("m/data.pkl", DATA_PKL), ("m/code/__torch__.py", b"class M(Module):\n  pass\n"),
     ("m/constants.pkl", b"\x80\x02)."), ("m/data/0", bytes(24))]))
bad = bytearray(checkpoint)
bad[-6:-2] = struct.pack("<I", 0x7FFF0000)  # central directory offset past the end
put("pytorch_zip", "cd_offset_past_end", bytes(bad))


# --- legacy pickle ---------------------------------------------------------------------------
MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19."
legacy = (MAGIC + b"\x80\x02M\xe9\x03." + b"\x80\x02}q\x00X\x0d\x00\x00\x00little_endianq\x01\x88s."
          + DATA_PKL.replace(b"K\x06tq\x08Q", b"K\x06Ntq\x08Q")
          + b"\x80\x02]q\x00X\x01\x00\x00\x000q\x01a." + struct.pack("<Q", 6) + bytes(24))
put("pickle", "legacy", legacy)
put("pickle", "data_pkl", DATA_PKL)
put("pickle", "binbytes8_2_62", b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n\x8e" + struct.pack("<Q", 2**62))


# --- ONNX ------------------------------------------------------------------------------------
def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([(v & 0x7F) | 0x80])
        v >>= 7
    return out + bytes([v])


def fv(field, v):
    return varint(field << 3) + varint(v)


def fb(field, b):
    return varint((field << 3) | 2) + varint(len(b)) + b


def tensor(name, dims, raw):
    return fb(1, b"".join(varint(d) for d in dims)) + fv(2, 1) + fb(8, name) + fb(9, raw)


opset16 = fb(1, b"") + fv(2, 16)
graph = fb(1, fb(1, b"x") + fb(2, b"y") + fb(4, b"Relu")) + fb(5, tensor(b"w", [4, 8], bytes(128)))
put("onnx", "model", fv(1, 8) + fb(2, b"spox") + fb(7, graph) + fb(8, opset16))
put("onnx", "field_2_40", fv(1, 8) + fb(8, opset16) + varint((7 << 3) | 2) + varint(2**40) + bytes(16))
deep = b""
for _ in range(20):
    deep = fb(1, fb(5, fb(6, deep)))
put("onnx", "deep_nesting", fv(1, 8) + fb(7, deep) + fb(8, opset16))
