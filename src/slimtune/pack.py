"""Storage codec: a quantized model directory <-> one entropy-coded file (`slimtune pack` / `slimtune unpack`).

File layout (integers little-endian):
  MAGIC (8 bytes) | format version u32 | total file length u64 | header length u64 | header JSON (utf-8)
  | streams (header offsets count from the first stream byte) | sha256 of every byte before it (32 bytes)
The header lists every tensor (name, dtype, shape, codec, offset, length, crc32 of the stored stream and of
the decoded bytes), the original safetensors header verbatim (metadata and tensor offsets included, so the
unpacked model.safetensors is byte-identical) and the other files of the directory (zstd, verbatim).
Integer code tensors (`*.qweight`, `*.zero_point`) are entropy coded with a model from their own histogram;
every other tensor is stored exactly (raw bytes, or zstd when that is smaller).
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import json
import struct
import tempfile
import zlib
from importlib.metadata import version
from pathlib import Path

import constriction
import numpy as np
import zstandard

from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir, atomic_write_bytes, check_output_path
from slimtune.models import read_config, resolve_model_path

MAGIC = b"SLIMPACK"
VERSION = 1
PREAMBLE = struct.Struct("<8sIQQ")  # magic, version, total file length, header length
DIGEST_SIZE = 32
CODECS = ("ans", "huffman")
TENSOR_FILE = "model.safetensors"
# safetensors dtypes of integer codes we entropy code; U8: codes of 4 bits or fewer, two a byte (each byte
# coded as one symbol of the pair)
CODE_DTYPES = {"I8": np.int8, "I16": np.int16, "U8": np.uint8}
CODE_SUFFIXES = (".qweight", ".zero_point")
HUFFMAN_BLOCK = 2048  # symbols per independently addressable block: decode loop length vs 32 bits of offset each
FLOAT_ZSTD_LEVEL = 10  # unquantized layers can be tens of MB; level 19 would take tens of seconds there
FILE_ZSTD_LEVEL = 19
HEADER_KEYS = {"tensor_file", "safetensors_header", "safetensors_sha256", "tensors", "files"}


# ------------------------------------------------------------------------------------------ symbols
def _histogram(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values present, their counts, each code's index among the present values). bincount, not np.unique:
    a sort of 22M codes would take seconds."""
    info = np.iinfo(codes.dtype)
    shifted = codes.ravel().astype(np.int32) - info.min
    counts = np.bincount(shifted, minlength=info.max - info.min + 1)
    present = np.flatnonzero(counts)
    lut = np.zeros(counts.size, np.int32)
    lut[present] = np.arange(present.size, dtype=np.int32)
    return present + info.min, counts[present], lut[shifted]


def _dense(values: np.ndarray, per_value: np.ndarray) -> tuple[int, list[int]]:
    """(first value, a list from the first to the last value present, 0 where absent): the compact header form
    (weight codes use nearly every value of their range, so listing the values would double the size)."""
    if values.size == 0:
        return 0, []
    dense = np.zeros(int(values[-1] - values[0]) + 1, np.int64)
    dense[values - values[0]] = per_value
    return int(values[0]), dense.tolist()


def _sparse(first: int, dense: list[int]) -> tuple[np.ndarray, np.ndarray]:
    dense = np.asarray(dense, np.int64)
    present = np.flatnonzero(dense)
    return present + first, dense[present]


def entropy_bits(counts) -> float:
    """n * H(histogram): the size in bits of an ideal order-0 code for these counts."""
    c = np.asarray(counts, np.float64)
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum())


# ------------------------------------------------------------------------------------------ Huffman
# Canonical Huffman is written here because no maintained offline library codes numpy symbol arrays with it
# (the packages found are pure-Python bit-by-bit coders, minutes for 22M codes). Encoding and decoding are
# vectorised: codes are OR-ed into bytes with bincount (their bits never overlap, so a sum is an OR), and the
# stream is cut into blocks of HUFFMAN_BLOCK symbols whose bit offsets are stored, so all blocks decode in
# lockstep, one table lookup by a fixed number of bits (the longest code length) per symbol and step.
def huffman_code_lengths(counts, max_length: int) -> np.ndarray:
    """Optimal code lengths for `counts`, limited to `max_length` bits; a single symbol gets length 0."""
    k = len(counts)
    if k <= 1:
        return np.zeros(k, np.int64)
    heap = [(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    parent = np.zeros(2 * k - 1, np.int64)
    for node in range(k, 2 * k - 1):  # internal nodes get increasing ids, so a parent's id exceeds its children's
        (c1, a), (c2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
    depth = np.zeros(2 * k - 1, np.int64)
    for node in range(2 * k - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    lengths = depth[:k]
    if lengths.max() <= max_length:
        return lengths
    # Clamp, then restore Kraft equality by splitting codes (miniz's method): each step removes one longest code
    # and splits a shorter one into two codes one bit longer. Shortest lengths go to the most frequent symbols.
    per_length = np.bincount(np.minimum(lengths, max_length), minlength=max_length + 1).tolist()
    total = sum(n << (max_length - i) for i, n in enumerate(per_length) if i)
    while total > 1 << max_length:
        per_length[max_length] -= 1
        i = next(i for i in range(max_length - 1, 0, -1) if per_length[i])
        per_length[i] -= 1
        per_length[i + 1] += 2
        total -= 1
    limited = np.empty(k, np.int64)
    limited[np.argsort(-np.asarray(counts), kind="stable")] = np.repeat(np.arange(max_length + 1), per_length)
    return limited


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbols ordered by (length, symbol), each one's canonical code): a code is the start of its interval
    in the L-bit space, shifted down to its own length."""
    longest = int(lengths.max())
    order = np.lexsort((np.arange(len(lengths)), lengths))
    span = np.left_shift(1, longest - lengths[order])
    starts = np.concatenate([[0], np.cumsum(span)[:-1]])
    return order, starts >> (longest - lengths[order])


def huffman_encode(codes: np.ndarray) -> tuple[dict, bytes]:
    values, counts, idx = _histogram(codes)
    # decoding reads L = longest-code bits at a time (a table of 2**L entries); L <= 25 keeps code + 7 bits in 32
    lengths = huffman_code_lengths(counts, max(16, (len(values) - 1).bit_length() + 2))
    if len(values) <= 1:  # a constant tensor: its value is all there is to store
        return {"first": int(values[0]) if values.size else 0, "lengths": [], "block": HUFFMAN_BLOCK}, b""
    first, dense = _dense(values, lengths)
    params = {"first": first, "lengths": dense, "block": HUFFMAN_BLOCK}
    order, canonical = _canonical(lengths)
    code_of = np.empty(len(values), np.int64)
    code_of[order] = canonical
    chunk = HUFFMAN_BLOCK * 512  # chunks bound the temporaries to a few tens of MB
    total_bits = int((lengths * counts).sum())
    out = np.zeros((total_bits + 7) // 8 + 4, np.float64)
    block_bits, bit_offset = [], 0
    for start in range(0, idx.size, chunk):
        ln = lengths[idx[start:start + chunk]]
        block_bits.append(np.add.reduceat(ln, np.arange(0, ln.size, HUFFMAN_BLOCK)))
        pos = np.cumsum(ln) - ln + bit_offset
        bit_offset += int(ln.sum())
        window = code_of[idx[start:start + chunk]] << (32 - ln - (pos & 7))  # the code left-aligned in 32 bits
        byte0 = int(pos[0]) >> 3
        local = (pos >> 3) - byte0
        for k in range(4):
            part = np.bincount(local + k, weights=(window >> (24 - 8 * k)) & 255)
            out[byte0:byte0 + part.size] += part
    return params, np.concatenate(block_bits).astype("<u4").tobytes() + out[:-4].astype(np.uint8).tobytes()


def huffman_decode(params: dict, stream: bytes, n: int) -> np.ndarray:
    """The `n` coded values."""
    values, lengths = _sparse(params["first"], params["lengths"])
    if len(values) == 0:
        return np.full(n, params["first"], np.int64)
    block, longest = int(params["block"]), int(lengths.max())
    blocks = -(-n // block)
    block_bits = np.frombuffer(stream[:4 * blocks], "<u4").astype(np.int64)
    order, _ = _canonical(lengths)
    table_sym = np.repeat(order.astype(np.int32), np.left_shift(1, longest - lengths[order]))
    if longest > 25 or table_sym.size != 1 << longest or block_bits.size != blocks:
        raise ValueError("code lengths or block table inconsistent")
    table_len = lengths[table_sym]
    b = np.frombuffer(stream[4 * blocks:] + bytes(4), np.uint8).astype(np.uint32)
    win = (b[:-3] << 24) | (b[1:-2] << 16) | (b[2:-1] << 8) | b[3:]  # the 32 bits starting at each byte
    starts = np.concatenate([[0], np.cumsum(block_bits)[:-1]])
    pos, mask, shift = starts.copy(), (1 << longest) - 1, 32 - longest
    rem = n - (blocks - 1) * block  # the last block may be short
    out = np.empty((block, blocks), np.int32)
    for j in range(block):
        m = blocks if j < rem else blocks - 1
        if m == 0:
            break
        p = pos[:m]
        w = (win[p >> 3] >> (shift - (p & 7))) & mask
        out[j, :m] = table_sym[w]
        pos[:m] = p + table_len[w]
    if not np.array_equal(pos - starts, block_bits):
        raise ValueError("block lengths do not match the decoded codes")
    return values[out.T.reshape(-1)[:n]]


# ------------------------------------------------------------------------------------------ ANS
# constriction's stack coder is ANS proper (its queue coder is a range coder): 32-bit words, 24-bit probabilities,
# so a stream costs the entropy plus well under 0.1% on weight tensors.
def _ans_model(counts):
    # float64 probabilities from stored integer counts: encoder and decoder build the identical model
    return constriction.stream.model.Categorical(np.asarray(counts, np.float64) / np.sum(counts), perfect=False)


def ans_encode(codes: np.ndarray) -> tuple[dict, bytes]:
    values, counts, idx = _histogram(codes)
    first, dense = _dense(values, counts)
    params = {"first": first, "counts": dense}
    if len(values) <= 1:
        return params, b""
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(idx, _ans_model(counts))
    return params, coder.get_compressed().astype("<u4").tobytes()


def ans_decode(params: dict, stream: bytes, n: int) -> np.ndarray:
    values, counts = _sparse(params["first"], params["counts"])
    if len(values) <= 1:
        return np.full(n, params["first"], np.int64)
    coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, "<u4").astype(np.uint32))
    idx = coder.decode(_ans_model(counts), n)
    if not coder.is_empty():
        raise ValueError("ANS stream not fully consumed")
    return values[idx]


def encode_codes(codes: np.ndarray, codec: str) -> tuple[dict, bytes]:
    """Entropy code an int8/int16 array: (parameters for the header, the stream)."""
    return (ans_encode if codec == "ans" else huffman_encode)(codes)


def decode_codes(params: dict, stream: bytes, n: int, dtype, codec: str) -> np.ndarray:
    return (ans_decode if codec == "ans" else huffman_decode)(params, stream, n).astype(dtype)


# ------------------------------------------------------------------------------------------ model directory
def _read_safetensors(path: Path) -> tuple[bytes, dict, memoryview]:
    """(the header bytes verbatim, the parsed header, the data section)."""
    if not path.is_file():
        raise SlimtuneError(f"{path}: not found")
    raw = path.read_bytes()
    try:
        (size,) = struct.unpack_from("<Q", raw)
        header = json.loads(raw[8:8 + size])
        spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    except (struct.error, ValueError, TypeError, KeyError) as e:
        raise SlimtuneError(f"{path}: not a valid safetensors file ({e})") from None
    data = memoryview(raw)[8 + size:]
    ends = [0] + [end for _, end in spans]
    if [start for start, _ in spans] != ends[:-1] or ends[-1] != len(data):
        raise SlimtuneError(f"{path}: tensor data is not contiguous (not a file written by safetensors)")
    return raw[:8 + size], header, data


def records_integer_codes(config: dict) -> bool:
    """A quantize stage's model, or a word student whose vector table is stored as int8 codes (one scale per
    row: `embeddings.qweight`), the bulk of its size."""
    return bool(config.get("slimtune_quantization")) or (config.get("slimtune_format") == "word-classifier"
                                                         and config.get("table") == "int8")


def _is_code_tensor(name: str, dtype: str) -> bool:
    return name.endswith(CODE_SUFFIXES) and dtype in CODE_DTYPES


def _has_code_tensors(st_header: dict) -> bool:
    return any(_is_code_tensor(k, v["dtype"]) for k, v in st_header.items() if k != "__metadata__")


def _other_files(model_dir: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(model_dir).as_posix(), p.read_bytes()) for p in sorted(model_dir.rglob("*"))
            if p.is_file() and p.relative_to(model_dir).as_posix() != TENSOR_FILE]


def _assemble(header: dict, streams: list[bytes]) -> bytes:
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    total = PREAMBLE.size + len(header_bytes) + sum(map(len, streams)) + DIGEST_SIZE
    body = b"".join([PREAMBLE.pack(MAGIC, VERSION, total, len(header_bytes)), header_bytes, *streams])
    return body + hashlib.sha256(body).digest()


def _code_tensors(st_header: dict, data: memoryview, codecs) -> tuple[dict, int, float]:
    """Per codec, [(header entry, stream)] of every tensor in data order; the number of *.qweight codes and the
    sum over them of n * H(histogram)."""
    names = sorted((k for k in st_header if k != "__metadata__"), key=lambda k: st_header[k]["data_offsets"][0])
    streams, weights, entropy = {c: [] for c in codecs}, 0, 0.0
    for name in names:
        info = st_header[name]
        raw = bytes(data[info["data_offsets"][0]:info["data_offsets"][1]])
        entry = {"name": name, "dtype": info["dtype"], "shape": info["shape"], "raw_crc32": zlib.crc32(raw)}
        if not _is_code_tensor(name, info["dtype"]):
            packed = zstandard.ZstdCompressor(level=FLOAT_ZSTD_LEVEL).compress(raw)
            method, stream = ("zstd", packed) if len(packed) < len(raw) else ("raw", raw)
            for c in codecs:
                streams[c].append(({**entry, "codec": method}, stream))
            continue
        codes = np.frombuffer(raw, np.dtype(CODE_DTYPES[info["dtype"]]).newbyteorder("<"))
        for c in codecs:
            params, stream = encode_codes(codes, c)
            streams[c].append(({**entry, "codec": c, "params": params}, stream))
        if name.endswith(".qweight"):
            weights += codes.size * (2 if info["dtype"] == "U8" else 1)
            entropy += entropy_bits(_histogram(codes)[1])
    return streams, weights, entropy


def pack_model(model_dir: str | Path, out: str | Path, codec: str = "ans", compare: bool = False,
               overwrite: bool = False) -> dict:
    """Pack a quantized model directory into one file; returns the size report (see `pack_report_table`).

    `compare` also codes the weights with the other codec and compresses the tensors' raw bytes with gzip -9 and
    zstd -19 for reference (zstd -19 takes ~15 s on a MiniLM).
    """

    if codec not in CODECS:
        raise SlimtuneError(f"codec '{codec}': unknown (choose one of: {', '.join(CODECS)})")
    # the gate, for files stored byte for byte: every file check, and shapes where the config describes a
    # model slimtune can build (pack itself never builds it)
    model_dir, out = resolve_model_path(model_dir, buildable=False), Path(out)
    if not records_integer_codes(read_config(model_dir)):
        raise SlimtuneError(f"{model_dir}: not quantized (config.json has no slimtune_quantization, nor a word "
                            "student's int8 table); run a quantize stage first")
    if out.is_dir() or (out.exists() and not overwrite):
        raise SlimtuneError(f"{out}: already exists" + ("" if out.is_dir() else " (use --overwrite to replace it)"))
    check_output_path(out, kind="file")
    st_path = model_dir / TENSOR_FILE
    st_header_bytes, st_header, data = _read_safetensors(st_path)
    if not _has_code_tensors(st_header):
        raise SlimtuneError(f"{st_path}: no integer *.qweight tensor although config.json records a quantization")
    codecs = CODECS if compare else (codec,)
    streams, weights, entropy = _code_tensors(st_header, data, codecs)
    zstd = zstandard.ZstdCompressor(level=FILE_ZSTD_LEVEL, write_checksum=True)
    files = [({"name": name, "size": len(b)}, zstd.compress(b)) for name, b in _other_files(model_dir)]
    blobs, report_codecs = {}, {}
    for c in codecs:
        tensors, files_meta = [dict(e) for e, _ in streams[c]], [dict(e) for e, _ in files]
        all_streams = [s for _, s in streams[c]] + [s for _, s in files]
        offsets = np.cumsum([0] + [len(s) for s in all_streams]).tolist()
        for entry, stream, offset in zip(tensors + files_meta, all_streams, offsets, strict=False):
            entry.update(offset=offset, length=len(stream), crc32=zlib.crc32(stream))
        header = {"format": "slimtune-pack", "codec": c, "constriction": version("constriction"),
                  "tensor_file": TENSOR_FILE, "safetensors_header": st_header_bytes[8:].decode("utf-8"),
                  "safetensors_sha256": hashlib.sha256(st_header_bytes + bytes(data)).hexdigest(),
                  "tensors": tensors, "files": files_meta}
        blobs[c] = _assemble(header, all_streams)
        weight_bytes = sum(len(s) for e, s in streams[c] if e["name"].endswith(".qweight") and e["codec"] == c)
        report_codecs[c] = {"packed_bytes": len(blobs[c]), "weight_stream_bytes": weight_bytes,
                            "tensor_stream_bytes": sum(len(s) for _, s in streams[c]),
                            "bits_per_weight": 8 * weight_bytes / weights}
    _rebuild(out, *_parse(blobs[codec], out))  # never write a file that does not decode back exactly
    atomic_write_bytes(out, blobs[codec])
    report = {"model_dir": str(model_dir), "out": str(out), "codec": codec, "packed_bytes": len(blobs[codec]),
              "quantized_weights": weights, "entropy_bits_per_weight": entropy / weights, "entropy_bytes": entropy / 8,
              "codecs": report_codecs, "safetensors_bytes": st_path.stat().st_size,
              "safetensors_tensor_bytes": len(data)}
    if compare:
        raw_tensors = bytes(data)
        report["gzip9_bytes"] = len(gzip.compress(raw_tensors, compresslevel=9, mtime=0))
        report["zstd19_bytes"] = len(zstandard.ZstdCompressor(level=19).compress(raw_tensors))
    return report


def packed_size_mb(model_dir: Path) -> float | None:
    """The size `slimtune pack` gets a model directory to (its default codec), or None when it has no
    integer codes to pack (a float model)."""
    if not records_integer_codes(read_config(model_dir)):
        return None
    if not _has_code_tensors(_read_safetensors(model_dir / TENSOR_FILE)[1]):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return round(pack_model(model_dir, Path(tmp) / "model.slim")["packed_bytes"] / 1e6, 3)


# ------------------------------------------------------------------------------------------ unpack
def read_packed(path: str | Path) -> tuple[dict, memoryview]:
    """(header, streams section) of a packed file, after checking its size and sha256."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"{path}: packed file not found")
    return _parse(path.read_bytes(), path)


def _parse(blob: bytes, path: Path) -> tuple[dict, memoryview]:
    if len(blob) < PREAMBLE.size + DIGEST_SIZE or blob[:len(MAGIC)] != MAGIC:
        raise SlimtuneError(f"{path}: not a slimtune packed file (bad magic or too short: {len(blob)} bytes)")
    _, file_version, total, header_size = PREAMBLE.unpack_from(blob)
    if file_version != VERSION:
        raise SlimtuneError(f"{path}: packed format version {file_version} is not supported (this reads {VERSION})")
    if total != len(blob):
        raise SlimtuneError(f"{path}: truncated or corrupt (the file has {len(blob)} bytes, its preamble says {total})")
    body = memoryview(blob)[:-DIGEST_SIZE]
    if hashlib.sha256(body).digest() != blob[-DIGEST_SIZE:]:
        raise SlimtuneError(f"{path}: corrupt (sha256 checksum mismatch)")
    try:
        header = json.loads(bytes(body[PREAMBLE.size:PREAMBLE.size + header_size]))
    except (ValueError, UnicodeDecodeError) as e:
        raise SlimtuneError(f"{path}: corrupt header ({e})") from None
    missing = HEADER_KEYS - set(header) if isinstance(header, dict) else HEADER_KEYS
    if missing:
        raise SlimtuneError(f"{path}: not a packed model (header lacks {', '.join(sorted(missing))})")
    return header, body[PREAMBLE.size + header_size:]


def _stream(path: Path, streams: memoryview, entry: dict) -> bytes:
    stream = bytes(streams[entry["offset"]:entry["offset"] + entry["length"]])
    if len(stream) != entry["length"] or zlib.crc32(stream) != entry["crc32"]:
        raise SlimtuneError(f"{path}: stream of '{entry['name']}' is corrupt (crc32 mismatch)")
    return stream


def _decode_tensor(path: Path, header: dict, streams: memoryview, entry: dict) -> bytes:
    stream, codec = _stream(path, streams, entry), entry["codec"]
    try:
        if codec in CODECS:
            dtype = np.dtype(CODE_DTYPES[entry["dtype"]]).newbyteorder("<")
            raw = decode_codes(entry["params"], stream, int(np.prod(entry["shape"])), dtype, codec).tobytes()
        else:
            raw = {"raw": lambda s: s, "zstd": zstandard.ZstdDecompressor().decompress}[codec](stream)
    except (ValueError, KeyError, IndexError, zstandard.ZstdError) as e:
        raise SlimtuneError(f"{path}: cannot decode '{entry['name']}' with codec '{codec}' ({e})") from None
    if zlib.crc32(raw) != entry["raw_crc32"]:
        raise SlimtuneError(f"{path}: '{entry['name']}' decodes to different bytes than were packed "
                            f"(packed with constriction {header.get('constriction')})")
    return raw


def unpack_model(packed: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Rebuild the model directory from a packed file: model.safetensors byte-identical, other files verbatim.
    Everything is decoded and checked before OUT is written (atomically)."""
    packed, out = Path(packed), Path(out)
    if out.exists() and not out.is_dir():
        raise SlimtuneError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SlimtuneError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    check_output_path(out, kind="directory")
    files = _rebuild(packed, *read_packed(packed))
    with atomic_dir(out) as tmp:
        for name, content in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(content)
    return out


def _rebuild(packed: Path, header: dict, streams: memoryview) -> dict[str, bytes]:
    """{path in the model directory: content}, every tensor and file checked against its checksum."""
    tensors = b"".join(_decode_tensor(packed, header, streams, e) for e in header["tensors"])
    st_header = header["safetensors_header"].encode("utf-8")
    st_bytes = struct.pack("<Q", len(st_header)) + st_header + tensors
    if hashlib.sha256(st_bytes).hexdigest() != header["safetensors_sha256"]:
        raise SlimtuneError(f"{packed}: rebuilt {header['tensor_file']} differs from the packed one (sha256)")
    files = {header["tensor_file"]: st_bytes}
    for entry in header["files"]:
        name = entry["name"]
        if Path(name).is_absolute() or ".." in Path(name).parts or name == header["tensor_file"]:
            raise SlimtuneError(f"{packed}: refusing file name '{name}' (outside the model directory)")
        try:  # zstd frames carry a checksum of their content
            files[name] = zstandard.ZstdDecompressor().decompress(_stream(packed, streams, entry))
        except zstandard.ZstdError as e:
            raise SlimtuneError(f"{packed}: cannot decompress '{name}' ({e})") from None
    return files


def pack_report_table(report: dict):
    """The report as a rich Table: whole files, and the tensors alone (what gzip / zstd were given)."""
    from rich.table import Table

    table = Table(title=f"{report['out']} ({report['quantized_weights']:,} quantized weights)")
    for col in ("storage", "file MB", "tensors MB", "tensors x safetensors", "bits/weight"):
        table.add_column(col, justify="left" if col == "storage" else "right")
    rows = [(f"packed, {c}" + (" (written)" if c == report["codec"] else ""), r["packed_bytes"],
             r["tensor_stream_bytes"], r["bits_per_weight"]) for c, r in report["codecs"].items()]
    rows += [("model.safetensors", report["safetensors_bytes"], report["safetensors_tensor_bytes"], None),
             ("entropy bound of the weight codes", None, report["entropy_bytes"], report["entropy_bits_per_weight"])]
    baselines = (("gzip -9 of the tensors", "gzip9_bytes"), ("zstd -19 of the tensors", "zstd19_bytes"))
    rows += [(label, None, report[key], None) for label, key in baselines if key in report]
    for label, file_bytes, tensor_bytes, bpw in rows:
        table.add_row(label, "" if file_bytes is None else f"{file_bytes / 1e6:.2f}", f"{tensor_bytes / 1e6:.2f}",
                      f"{tensor_bytes / report['safetensors_tensor_bytes']:.3f}", "" if bpw is None else f"{bpw:.3f}")
    return table
