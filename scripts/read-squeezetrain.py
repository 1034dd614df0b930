#!/usr/bin/env python3
"""Reads squeezetrain's model files into numpy arrays, written from the documents alone
(docs/compressed-format.md, docs/model-config.md and the safetensors format), with no squeezetrain code.

    scripts/read-squeezetrain.py MODEL.sqz [--output OUT.npz]
    scripts/read-squeezetrain.py WEIGHTS.safetensors [--output OUT.safetensors]

A compressed model (.sqz; checksum and structure verified) is decoded to dense float32 arrays; a weights
file (.safetensors) is read as it is. The output is an .npz (one array per tensor, under its torchvision
name) or, when OUT ends in .safetensors, a safetensors file whose "squeezetrain.model" metadata holds the
model configuration. The configuration is printed as JSON with the defaults of absent keys filled in.
Python 3 and numpy only.
"""
import argparse
import json
import struct
import sys
import zlib

import numpy as np

# docs/model-config.md: keys that older files may lack, and their defaults.
CONFIG_DEFAULTS = {
    "inputMean": [0.4914, 0.4822, 0.4465],
    "inputStd": [0.2470, 0.2435, 0.2616],
    "batchNormEps": 1e-5,
}
MAX_CODE_LENGTH = 20


class FormatError(Exception):
    pass


class Reader:
    """Little-endian fields of `data[:end]`, never past `end`."""

    def __init__(self, data, end):
        self.data, self.end, self.pos = data, end, 0

    def bytes(self, n):
        if n > self.end - self.pos:
            raise FormatError(f"truncated: {n} bytes needed at offset {self.pos}, {self.end - self.pos} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self):
        return self.bytes(1)[0]

    def u16(self):
        return struct.unpack("<H", self.bytes(2))[0]

    def u32(self):
        return struct.unpack("<I", self.bytes(4))[0]

    def f32s(self, n):
        return np.frombuffer(self.bytes(4 * n), dtype="<f4").copy()


def canonical_codes(lengths):
    """{(length, code): symbol} of the canonical Huffman code with these lengths (RFC 1951, 3.2.2)."""
    if any(l > MAX_CODE_LENGTH for l in lengths):
        raise FormatError(f"a code length exceeds {MAX_CODE_LENGTH} bits")
    if sum(2.0 ** -l for l in lengths if l > 0) > 1:
        raise FormatError("the code lengths over-subscribe the code space")
    count = [0] * (MAX_CODE_LENGTH + 1)
    for l in lengths:
        if l > 0:
            count[l] += 1
    next_code, code = [0] * (MAX_CODE_LENGTH + 2), 0
    for bits in range(1, MAX_CODE_LENGTH + 1):
        code = (code + count[bits - 1]) << 1
        next_code[bits] = code
    table = {}
    for symbol in sorted((s for s in range(len(lengths)) if lengths[s] > 0), key=lambda s: (lengths[s], s)):
        table[(lengths[symbol], next_code[lengths[symbol]])] = symbol
        next_code[lengths[symbol]] += 1
    return table


def huffman_decode(stream, lengths, n):
    """Exactly n symbols from `stream`, bits taken from each byte's 0x80 bit down; the stream must be
    exactly ceil(bits / 8) bytes with zero padding bits."""
    table = canonical_codes(lengths)
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8)).tolist()  # 0x80 first
    out, pos = [], 0
    for _ in range(n):
        code, length = 0, 0
        while True:
            if pos >= len(bits):
                raise FormatError("a Huffman stream ends early")
            code, length, pos = code << 1 | bits[pos], length + 1, pos + 1
            symbol = table.get((length, code))
            if symbol is not None:
                out.append(symbol)
                break
            if length >= MAX_CODE_LENGTH:
                raise FormatError("a Huffman stream holds a bit pattern that is no code")
    if len(stream) != (pos + 7) // 8 or any(bits[pos:]):
        raise FormatError("a Huffman stream has trailing bytes or non-zero padding")
    return np.array(out, dtype=np.int64)


def read_sqz(path):
    data = open(path, "rb").read()
    if len(data) < 12 or data[:4] != b"SQZC":
        raise FormatError("not a compressed model (wrong magic)")
    if struct.unpack("<I", data[-4:])[0] != zlib.crc32(data[:-4]):
        raise FormatError("checksum mismatch")
    r = Reader(data, len(data) - 4)
    r.bytes(4)
    version, flags = r.u16(), r.u16()
    if version != 1 or flags != 0:
        raise FormatError(f"version {version}, flags {flags}: only version 1 with flags 0 is known")
    config = json.loads(r.bytes(r.u32()).decode("utf-8"))
    tensors = {}
    for _ in range(r.u32()):
        name = r.bytes(r.u16()).decode("utf-8")
        if name in tensors:
            raise FormatError(f"tensor {name} appears twice")
        shape = tuple(r.u32() for _ in range(r.u8()))
        size = int(np.prod(shape, dtype=np.int64))
        storage = r.u8()
        if storage == 0:
            values = r.f32s(size)
        elif storage == 1:
            values = read_shared(r, size, name)
        else:
            raise FormatError(f"tensor {name}: unknown storage {storage}")
        if not np.all(np.isfinite(values)):
            raise FormatError(f"tensor {name} holds a value that is not finite")
        tensors[name] = values.reshape(shape)
    if r.pos != r.end:
        raise FormatError(f"{r.end - r.pos} bytes after the last tensor")
    return config, tensors


def read_shared(r, size, name):
    bits, k = r.u8(), r.u16()
    if not (1 <= bits <= 8 and 1 <= k <= 1 << bits):
        raise FormatError(f"tensor {name}: a codebook of {k} values for {bits}-bit codes")
    codebook = r.f32s(k)
    if codebook[0] != 0:
        raise FormatError(f"tensor {name}: codebook entry 0 is {codebook[0]}, not 0")
    index_bits = r.u8()
    if not 1 <= index_bits <= 8:
        raise FormatError(f"tensor {name}: {index_bits}-bit relative indices")
    n = r.u32()
    if n > size:
        raise FormatError(f"tensor {name}: {n} entries for {size} values")
    code_lengths, gap_lengths = list(r.bytes(k)), list(r.bytes(1 << index_bits))
    codes = huffman_decode(r.bytes(r.u32()), code_lengths, n)
    gaps = huffman_decode(r.bytes(r.u32()), gap_lengths, n)
    positions = np.cumsum(gaps + 1) - 1  # entry e is gaps[e] + 1 positions after entry e - 1; start at -1
    if n and positions[-1] >= size:
        raise FormatError(f"tensor {name}: the relative indices run past its {size} values")
    dense = np.zeros(size, dtype=np.float32)
    dense[positions] = codebook[codes]
    return dense


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                      "I8": "i1", "U8": "u1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "BOOL": "?"}


def read_safetensors(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in sorted(header.items()):
        begin, end = entry["data_offsets"]
        raw = data[8 + n + begin:8 + n + end]
        tensors[name] = np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()
    config = json.loads(metadata["squeezetrain.model"]) if "squeezetrain.model" in metadata else None
    return config, tensors


def write_safetensors(path, tensors, metadata):
    names = sorted(tensors)
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        a = tensors[name]
        dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}[a.dtype.str if a.dtype.str != "|b1" else "?"]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a compressed model (.sqz) or a weights file (.safetensors)")
    parser.add_argument("--output", help="where to write the arrays (.npz, or .safetensors)")
    args = parser.parse_args()
    with open(args.file, "rb") as f:
        magic = f.read(4)
    try:
        config, tensors = read_sqz(args.file) if magic == b"SQZC" else read_safetensors(args.file)
    except (FormatError, ValueError, KeyError, struct.error) as e:
        sys.exit(f"{args.file}: {e}")
    if config is not None:
        config = {**CONFIG_DEFAULTS, **config}
        print(json.dumps(config, sort_keys=True))
    print(f"{len(tensors)} tensors, {sum(a.size for a in tensors.values())} values", file=sys.stderr)
    if args.output and args.output.endswith(".safetensors"):
        metadata = {"squeezetrain.model": json.dumps(config, sort_keys=True)} if config is not None else {}
        write_safetensors(args.output, tensors, metadata)
    elif args.output:
        np.savez(args.output, **tensors)


if __name__ == "__main__":
    main()
