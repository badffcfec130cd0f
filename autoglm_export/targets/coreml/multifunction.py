"""One multifunction ``.mlpackage`` from single-function packages, without coremltools'
``save_multifunction``: that loads every function into pymil (a numpy copy of every weight) and
deduplicates the constants there, which took 17.8 GiB for the 9B's 151552 x 4096 token embedding
(prefill + decode). Here the programs stay protobuf messages and the weights stay bytes: a blob of a
later function that is byte-identical to one already written is shared (a component's prefill and
decode functions hold the same weights), any other is appended. Peak memory is the weight files.

``weights/weight.bin``: a 64-byte header (blob count, version), then per blob a 64-byte metadata
record (sentinel 0xDEADBEEF, storage type, size, offset of the data) and the data, each record at a
64-byte boundary; programs address a blob by the offset of its record.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

SENTINEL = 0xDEADBEEF
ALIGN = 64
IOS18_SPEC = 9  # multifunction packages need specification version 9 (iOS 18)


def _paths(pkg: Path) -> tuple[Path, Path]:
    manifest = json.loads((pkg / "Manifest.json").read_text())
    items = manifest["itemInfoEntries"]
    model = pkg / "Data" / items[manifest["rootModelIdentifier"]]["path"]
    weights = [pkg / "Data" / e["path"] / "weight.bin" for e in items.values() if e["name"] == "weights"]
    return model, weights[0]


def _values(op):
    """Every Value of an op (input bindings and attributes) and of the ops of its nested blocks, in
    key order: protobuf map order varies between processes, and it decides the weight file's layout."""
    for key in sorted(op.inputs):
        for binding in op.inputs[key].arguments:
            if binding.WhichOneof("binding") == "value":
                yield binding.value
    for key in sorted(op.attributes):
        yield op.attributes[key]
    for block in op.blocks:
        for inner in block.operations:
            yield from _values(inner)


class _WeightWriter:
    def __init__(self) -> None:
        self.data = bytearray(ALIGN)
        self.count = 0
        self.index: dict[tuple[int, bytes], int] = {}  # (storage type, digest) -> record offset

    def add(self, dtype: int, payload: bytes) -> int:
        key = (dtype, hashlib.sha256(payload).digest())
        if key in self.index:
            return self.index[key]
        record = -(-len(self.data) // ALIGN) * ALIGN
        self.data += bytes(record - len(self.data))
        self.data += struct.pack("<IIQQ", SENTINEL, dtype, len(payload), record + ALIGN).ljust(ALIGN, b"\0")
        self.data += payload
        self.count += 1
        self.index[key] = record
        return record

    def finish(self) -> bytes:
        struct.pack_into("<II", self.data, 0, self.count, 2)
        return bytes(self.data)


def merge_functions(parts: dict[str, Path], dest: Path, default_function: str) -> None:
    """Write ``dest``: the ``main`` function of each package in ``parts`` under its key."""
    from coremltools.proto import Model_pb2

    out = Model_pb2.Model()
    writer = _WeightWriter()
    for fn, pkg in parts.items():
        model_path, weight_path = _paths(Path(pkg))
        spec = Model_pb2.Model()
        spec.ParseFromString(model_path.read_bytes())
        weights = weight_path.read_bytes()
        main = spec.mlProgram.functions["main"]
        for block in main.block_specializations.values():
            for op in block.operations:
                for value in _values(op):
                    if value.WhichOneof("value") != "blobFileValue":
                        continue
                    offset = value.blobFileValue.offset
                    sentinel, dtype, size, data_offset = struct.unpack_from("<IIQQ", weights, offset)
                    if sentinel != SENTINEL:
                        raise ValueError(f"{weight_path}: no blob record at offset {offset}")
                    value.blobFileValue.offset = writer.add(dtype, weights[data_offset : data_offset + size])
        del weights
        if not out.HasField("mlProgram"):
            out.specificationVersion = max(spec.specificationVersion, IOS18_SPEC)
            out.mlProgram.version = spec.mlProgram.version
            for k, v in spec.mlProgram.attributes.items():
                out.mlProgram.attributes[k].CopyFrom(v)
        out.specificationVersion = max(out.specificationVersion, spec.specificationVersion)
        out.mlProgram.functions[fn].CopyFrom(main)
        d = spec.description
        out.description.functions.add(
            name=fn,
            input=d.input,
            output=d.output,
            state=d.state,
            predictedFeatureName=d.predictedFeatureName,
            predictedProbabilitiesName=d.predictedProbabilitiesName,
        )
    out.description.defaultFunctionName = default_function
    first = Path(next(iter(parts.values())))
    shutil.copytree(first, dest, ignore=shutil.ignore_patterns("weight.bin", "*.mlmodel"))
    model_path, weight_path = _paths(dest)
    model_path.write_bytes(out.SerializeToString(deterministic=True))
    weight_path.write_bytes(writer.finish())
