"""Read a Core ML ML Program package without Core ML, and execute it with numpy.

Core ML's runtime exists only on Apple platforms and coremltools has no MIL interpreter, so on
Linux the bundle's ``.mlpackage`` files are checked by reading them ourselves:

* ``WeightFile`` decodes ``weights/weight.bin`` (a 64-byte file header, then per blob a 64-byte
  metadata record marked 0xDEADBEEF: data type, size, data offset); INT4 is packed two per byte,
  low nibble first.
* ``MilProgram`` parses ``model.mlmodel`` (the protobuf Model) into functions of operations.
* ``MilInterpreter`` runs a function on numpy arrays for the op subset our packages use, with
  Core ML states kept between calls. Every op computes in float32 and rounds its result to the
  output's declared type (fp16 here), so this is what the program *means* at fp16 storage with
  fp32 accumulation — not Core ML's kernels, whose accumulation and op fusion may differ.

An op outside the subset is an error naming it, never a silent pass-through.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOB_SENTINEL = 0xDEADBEEF
# MILBlob storage types (weight.bin metadata), the ones our packages hold
BLOB_DTYPES = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 8: "int4", 11: "uint4", 14: "int32"}
NP_TYPES = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "int4": np.int8,
    "uint4": np.uint8,
    "bool": np.bool_,
}
# MIL proto DataType names -> ours
PROTO_TYPES = {
    "FLOAT16": "fp16",
    "FLOAT32": "fp32",
    "FLOAT64": "fp64",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "INT4": "int4",
    "UINT4": "uint4",
    "BOOL": "bool",
    "STRING": "string",
}


class PackageError(RuntimeError):
    pass


def unpack_int4(raw: bytes, count: int, signed: bool) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8)
    out = np.empty(b.size * 2, np.uint8)
    out[0::2], out[1::2] = b & 0x0F, b >> 4  # low nibble first
    out = out[:count]
    if signed:
        return np.where(out >= 8, out.astype(np.int16) - 16, out).astype(np.int8)
    return out


class WeightFile:
    """``weights/weight.bin``: blobs addressed by the offset of their metadata record."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.data = self.path.read_bytes()
        if len(self.data) < 64:
            raise PackageError(f"{self.path}: shorter than the 64-byte header")
        self.count, self.version = struct.unpack_from("<II", self.data, 0)

    def blob(self, offset: int) -> tuple[str, bytes]:
        sentinel, dtype, size, data_offset = struct.unpack_from("<IIQQ", self.data, offset)
        if sentinel != BLOB_SENTINEL:
            raise PackageError(f"{self.path}: no blob metadata at offset {offset} (sentinel {sentinel:#x})")
        if dtype not in BLOB_DTYPES:
            raise PackageError(f"{self.path}: blob at {offset} has storage type {dtype}, not one this reader knows")
        if data_offset + size > len(self.data):
            raise PackageError(f"{self.path}: blob at {offset} runs past the end of the file")
        return BLOB_DTYPES[dtype], self.data[data_offset : data_offset + size]

    def array(self, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        stored, raw = self.blob(offset)
        if stored != dtype:
            raise PackageError(f"{self.path}: blob at {offset} is {stored}, the program says {dtype}")
        count = int(np.prod(shape)) if shape else 1
        if dtype in ("int4", "uint4"):
            return unpack_int4(raw, count, dtype == "int4").reshape(shape)
        return np.frombuffer(raw, NP_TYPES[dtype], count).reshape(shape)


@dataclass(frozen=True)
class BlobRef:
    """A constant stored in weight.bin, not decoded (``MilProgram(weights=False)``)."""

    offset: int
    shape: tuple
    dtype: str


@dataclass
class TensorType:
    dtype: str
    shape: tuple  # ints; None for a dimension that is not a constant
    state: bool = False

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), **({"state": True} if self.state else {})}


def _tensor_type(vt) -> TensorType:
    state = vt.WhichOneof("type") == "stateType"
    if state:
        vt = vt.stateType.wrappedType
    kind = vt.WhichOneof("type")
    if kind != "tensorType":
        raise PackageError(f"value type {kind} is not a tensor")
    tt = vt.tensorType
    from coremltools.proto import MIL_pb2

    name = MIL_pb2.DataType.Name(tt.dataType)
    dims = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions)
    return TensorType(PROTO_TYPES.get(name, name.lower()), dims, state)


@dataclass
class Op:
    type: str
    name: str
    inputs: dict  # input name -> list of ("var", name) | ("value", ndarray)
    outputs: list[tuple[str, TensorType]]
    attributes: dict


@dataclass
class Function:
    name: str
    inputs: dict[str, TensorType]
    outputs: list[str]
    ops: list[Op]


class MilProgram:
    """One ``.mlpackage``: its functions, description and weights."""

    def __init__(self, package: Path, weights: bool = True) -> None:
        """``weights=False``: blob-backed constants are left undecoded (``BlobRef``), for readers that
        need the program's structure only."""
        from coremltools.proto import Model_pb2

        self.package = Path(package)
        manifest = json.loads((self.package / "Manifest.json").read_text())
        items = manifest["itemInfoEntries"]
        root = items[manifest["rootModelIdentifier"]]
        base = self.package / "Data"
        self.model_path = base / root["path"]
        load = weights
        weights = [base / e["path"] for e in items.values() if e["name"] == "weights"]
        self.lazy = not load
        self.spec = Model_pb2.Model()
        self.spec.ParseFromString(self.model_path.read_bytes())
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise PackageError(f"{self.model_path}: not an ML Program")
        self.weights = WeightFile(weights[0] / "weight.bin") if weights and load else None
        self.functions: dict[str, Function] = {}
        for fname, f in self.spec.mlProgram.functions.items():
            block = f.block_specializations[f.opset]
            ops = [self._op(o) for o in block.operations]
            inputs = {i.name: _tensor_type(i.type) for i in f.inputs}
            self.functions[fname] = Function(fname, inputs, list(block.outputs), ops)

    def _value(self, v) -> np.ndarray:
        t = _tensor_type(v.type)
        kind = v.WhichOneof("value")
        if kind == "blobFileValue":
            if self.lazy:
                return BlobRef(v.blobFileValue.offset, t.shape, t.dtype)
            if self.weights is None:
                raise PackageError(f"{self.package}: a blob is referenced but the package has no weights")
            return self.weights.array(v.blobFileValue.offset, t.shape, t.dtype)
        if kind != "immediateValue":
            raise PackageError(f"{self.package}: value kind {kind} is not supported")
        tv = v.immediateValue.tensor
        field = tv.WhichOneof("value")
        shape = t.shape
        if field == "strings":
            vals = list(tv.strings.values)
            return np.array(vals[0] if not shape else vals, dtype=object)
        if field == "bytes":
            raw = tv.bytes.values
            count = int(np.prod(shape)) if shape else 1
            if t.dtype in ("int4", "uint4"):
                return unpack_int4(raw, count, t.dtype == "int4").reshape(shape)
            return np.frombuffer(raw, NP_TYPES[t.dtype], count).reshape(shape)
        vals = getattr(tv, field).values if field else []
        return np.asarray(list(vals), dtype=NP_TYPES[t.dtype]).reshape(shape)

    def _op(self, o) -> Op:
        inputs = {}
        for key, arg in o.inputs.items():
            inputs[key] = [
                ("var", b.name) if b.WhichOneof("binding") == "name" else ("value", self._value(b.value))
                for b in arg.arguments
            ]
        attrs = {k: self._value(v) for k, v in o.attributes.items() if k != "name"}
        name = str(self._value(o.attributes["name"])) if "name" in o.attributes else o.outputs[0].name
        return Op(o.type, name, inputs, [(x.name, _tensor_type(x.type)) for x in o.outputs], attrs)

    def description(self) -> dict:
        d = self.spec.description
        return {
            "inputs": [i.name for i in d.input],
            "outputs": [o.name for o in d.output],
            "states": [s.name for s in d.state],
            "functions": sorted(self.functions),
            "default_function": d.defaultFunctionName or None,
        }


# ----------------------------------------------------------------------------------------
# Interpreter
# ----------------------------------------------------------------------------------------


def _f(x):
    return np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)


def _axes(v, rank):
    return tuple(int(a) % rank for a in np.atleast_1d(v))


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    idx = []
    n = x.ndim
    stride = np.ones(n, int) if stride is None else stride
    for i in range(n):
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        if squeeze_mask is not None and squeeze_mask[i]:
            idx.append(int(begin[i]))
        else:
            idx.append(slice(b, e, int(stride[i])))
    return tuple(idx)


def _blockwise(data, scale, offset=None):
    q = data.astype(np.float32)
    if offset is not None:
        q = q - _expand_blocks(offset.astype(np.float32), q.shape)
    return q * _expand_blocks(scale.astype(np.float32), q.shape)


def _expand_blocks(p, shape):
    for axis, (n, m) in enumerate(zip(shape, p.shape)):
        if m != n:
            p = np.repeat(p, n // m, axis=axis)
    return p


def _conv(x, w, bias, strides, pad, dilations, groups):
    """N-D convolution (1-D: audio front end; 2-D: patch embedding, merger downsample) with
    explicit padding: x [N, Cin, *S], w [Cout, Cin/groups, *K]."""
    from numpy.lib.stride_tricks import sliding_window_view

    nd = x.ndim - 2
    if nd not in (1, 2):
        raise PackageError(f"conv: only 1-D and 2-D convolutions are interpreted (no Conv3d), got rank {x.ndim}")
    pad = [int(p) for p in pad] if pad is not None else [0] * (2 * nd)
    x = np.pad(x, [(0, 0), (0, 0), *[(pad[2 * i], pad[2 * i + 1]) for i in range(nd)]])
    k = w.shape[2:]
    d = [int(v) for v in dilations]
    s = [int(v) for v in strides]
    span = [d[i] * (k[i] - 1) + 1 for i in range(nd)]
    win = sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))  # [N, C, *out_full, *span]
    sl = (
        slice(None),
        slice(None),
        *[slice(None, None, s[i]) for i in range(nd)],
        *[slice(None, None, d[i]) for i in range(nd)],
    )
    win = win[sl]  # [N, C, *out, *K]
    g = int(groups)
    cin, cout = w.shape[1], w.shape[0] // g
    spatial = "".join("hw"[:nd])
    kern = "".join("ij"[:nd])
    outs = [
        np.einsum(
            f"nc{spatial}{kern},oc{kern}->no{spatial}",
            win[:, gi * cin : (gi + 1) * cin],
            w[gi * cout : (gi + 1) * cout],
        )
        for gi in range(g)
    ]
    y = np.concatenate(outs, axis=1)
    return y if bias is None else y + bias.reshape(1, -1, *[1] * nd)


def _gelu(x, mode):
    if str(mode) == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf, otypes=[np.float32])(x / np.sqrt(2.0)))


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    ax = _axes(axes, x.ndim)
    m = x.mean(axis=ax, keepdims=True)
    v = ((x - m) ** 2).mean(axis=ax, keepdims=True)
    y = (x - m) / np.sqrt(v + float(epsilon))
    if gamma is not None:
        y = y * gamma
    return y if beta is None else y + beta


OPS = {
    "abs": lambda x: np.abs(x),
    "square": lambda x: x * x,
    "sqrt": lambda x: np.sqrt(x),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(x + float(epsilon)),
    "exp": lambda x: np.exp(x),
    "tanh": lambda x: np.tanh(x),
    "sin": lambda x: np.sin(x),
    "cos": lambda x: np.cos(x),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "silu": lambda x: x / (1 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0),
    "erf": lambda x: np.vectorize(__import__("math").erf, otypes=[np.float32])(x),
    "inverse": lambda x, epsilon=1e-4: 1.0 / (x + float(epsilon)),
    "gelu": lambda x, mode="EXACT": _gelu(x, mode),
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "real_div": lambda x, y: x / y,
    "maximum": lambda x, y: np.maximum(x, y),
    "minimum": lambda x, y: np.minimum(x, y),
    "pow": lambda x, y: np.power(x, y),
    "floor_div": lambda x, y: np.floor_divide(x, y),
    "equal": lambda x, y: x == y,
    "not_equal": lambda x, y: x != y,
    "less": lambda x, y: x < y,
    "less_equal": lambda x, y: x <= y,
    "greater": lambda x, y: x > y,
    "greater_equal": lambda x, y: x >= y,
    "logical_and": lambda x, y: np.logical_and(x, y),
    "logical_not": lambda x: np.logical_not(x),
    "select": lambda cond, a, b: np.where(cond, a, b),
    "reduce_max": lambda x, axes=None, keep_dims=False: x.max(axis=_axes(axes, x.ndim), keepdims=bool(keep_dims)),
    "reduce_min": lambda x, axes=None, keep_dims=False: x.min(axis=_axes(axes, x.ndim), keepdims=bool(keep_dims)),
    "reduce_mean": lambda x, axes=None, keep_dims=False: x.mean(axis=_axes(axes, x.ndim), keepdims=bool(keep_dims)),
    "reduce_sum": lambda x, axes=None, keep_dims=False: x.sum(axis=_axes(axes, x.ndim), keepdims=bool(keep_dims)),
    "linear": lambda x, weight, bias=None: x @ weight.T + (0 if bias is None else bias),
    "matmul": lambda x, y, transpose_x=False, transpose_y=False: np.matmul(
        np.swapaxes(x, -1, -2) if transpose_x else x, np.swapaxes(y, -1, -2) if transpose_y else y
    ),
    "reshape": lambda x, shape: x.reshape([int(s) for s in shape]),
    "shape": lambda x: np.array(x.shape, np.int32),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(
        x, tuple(int(a) % (x.ndim + len(np.atleast_1d(axes))) for a in np.atleast_1d(axes))
    ),
    "squeeze": lambda x, axes=None: np.squeeze(x, None if axes is None else _axes(axes, x.ndim)),
    "tile": lambda x, reps: np.tile(x, [int(r) for r in reps]),
    "softmax": lambda x, axis=-1: _softmax(x, int(axis)),
    "layer_norm": _layer_norm,
    "gather": lambda x, indices, axis=0, batch_dims=0, validate_indices=False: np.take(
        x, indices.astype(np.int64), axis=int(axis)
    ),
    "conv": lambda x, weight, bias=None, strides=(1,), pad_type="valid", pad=(0, 0), dilations=(1,), groups=1: _conv(
        x, weight, bias, strides, pad, dilations, groups
    ),
    "slice_by_index": lambda x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None: x[
        _slice_by_index(x, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    ],
    "slice_by_size": lambda x, begin, size: x[
        tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    ],
    "constexpr_blockwise_shift_scale": _blockwise,
}
CONSTEXPR = ("constexpr_blockwise_shift_scale",)


def _concat(values, axis, interleave=False):
    if interleave:
        raise PackageError("concat with interleave is not interpreted")
    return np.concatenate([np.atleast_1d(v) for v in values], axis=int(axis))


def _split(x, axis, num_splits=None, split_sizes=None):
    if split_sizes is not None:
        return np.split(x, np.cumsum([int(s) for s in split_sizes])[:-1], axis=int(axis))
    return np.split(x, int(num_splits), axis=int(axis))


class MilInterpreter:
    """Runs the functions of one ``MilProgram``; ``states`` (name -> array) persist across calls."""

    def __init__(self, program: MilProgram) -> None:
        self.program = program
        self.states: dict[str, np.ndarray] = {}
        self._consts: dict[str, dict[str, np.ndarray]] = {}
        self.reset()

    def reset(self) -> None:
        for f in self.program.functions.values():
            for name, t in f.inputs.items():
                if t.state:
                    self.states[name] = np.zeros(t.shape, NP_TYPES[t.dtype])

    def _constants(self, f: Function) -> dict[str, np.ndarray]:
        # constants and decompressed weights do not depend on inputs: evaluate them once
        if f.name not in self._consts:
            env: dict[str, np.ndarray] = {}
            for op in f.ops:
                if op.type == "const":
                    env[op.outputs[0][0]] = op.attributes["val"]
                elif op.type in CONSTEXPR:
                    args = self._args(op, env)
                    env[op.outputs[0][0]] = np.asarray(OPS[op.type](**args)).astype(NP_TYPES[op.outputs[0][1].dtype])
            self._consts[f.name] = env
        return self._consts[f.name]

    @staticmethod
    def _args(op: Op, env: dict) -> dict:
        out = {}
        for key, bindings in op.inputs.items():
            vals = [env[b] if kind == "var" else b for kind, b in bindings]
            out[key] = vals if key == "values" else vals[0]
        return out

    def run(self, function: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        f = self.program.functions[function]
        env = dict(self._constants(f))
        for name, t in f.inputs.items():
            if t.state:
                env[name] = name  # a state is referenced by name; its value lives in self.states
                continue
            if name not in feeds:
                raise PackageError(f"{self.program.package.name}:{function}: input {name!r} not given")
            x = np.asarray(feeds[name])
            if tuple(x.shape) != tuple(t.shape):
                raise PackageError(
                    f"{self.program.package.name}:{function}: input {name} shape {x.shape}, expected {t.shape}"
                )
            env[name] = x.astype(NP_TYPES[t.dtype])
        for op in f.ops:
            if op.type == "const" or op.type in CONSTEXPR:
                continue
            args = self._args(op, env)
            outs = op.outputs
            if op.type == "read_state":
                res = [self.states[args["input"]].copy()]
            elif op.type == "write_state":
                self.states[args["input"]] = np.asarray(args["data"]).astype(self.states[args["input"]].dtype)
                res = []
            elif op.type == "coreml_update_state":
                self.states[args["state"]] = np.asarray(args["value"]).astype(self.states[args["state"]].dtype)
                res = [self.states[args["state"]].copy()]
            elif op.type == "cast":
                res = [np.asarray(args["x"])]
            elif op.type == "concat":
                res = [_concat([_f(v) for v in args["values"]], args["axis"], bool(args.get("interleave", False)))]
            elif op.type == "split":
                res = _split(_f(args.pop("x")), **args)
            elif op.type == "slice_update":
                x = np.array(args["x"], copy=True)
                idx = _slice_by_index(
                    x,
                    args["begin"],
                    args["end"],
                    args.get("stride"),
                    args.get("begin_mask"),
                    args.get("end_mask"),
                    args.get("squeeze_mask"),
                )
                x[idx] = args["update"]
                res = [x]
            elif op.type in OPS:
                res = [
                    OPS[op.type](
                        **{
                            k: (_f(v) if isinstance(v, np.ndarray) and v.dtype != object else v)
                            for k, v in args.items()
                        }
                    )
                ]
            else:
                raise PackageError(
                    f"{self.program.package.name}:{function}: op {op.type!r} ({op.name}) is not in the "
                    "interpreter's subset; add its semantics to lower/coreml_mil.py"
                )
            for (oname, t), val in zip(outs, res):
                val = np.asarray(val)
                if t.dtype in NP_TYPES:
                    val = val.astype(NP_TYPES[t.dtype])
                if t.shape and None not in t.shape and tuple(val.shape) != tuple(t.shape):
                    raise PackageError(
                        f"{self.program.package.name}:{function}: {op.type} {op.name} gave shape "
                        f"{val.shape}, the program declares {t.shape}"
                    )
                env[oname] = val
        return {name: env[name] for name in f.outputs}
