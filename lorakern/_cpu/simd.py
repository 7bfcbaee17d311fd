"""Explicit SIMD vectors for Numba: a vector type and the handful of operations the
micro-kernels need, each emitted as one LLVM instruction (Numba's @intrinsic).

LLVM's loop vectoriser only vectorises innermost loops and would not keep a block of
accumulators in registers across the rank loop (benchmarks/NOTES.md); with these the
micro-kernels in kernels.py are written as register blocks explicitly:

    acc = vfma(vbroadcast(B[i, k]), vload(A, k, j), acc)     # <8 x float> FMA on AVX2

A vector has ``LANES[dtype]`` lanes: 32 bytes, one AVX2 register (8 float32, 4 float64).
``available()`` says whether this CPU has AVX2 and FMA; without them kernels.py uses its
portable loops (LLVM would emulate llvm.fma with a library call, which is slow).

Also here: ``atomic_add(counter, value)``, the work counter of the dynamic scheduler.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, models, register_model

#: vector width in bytes: one AVX2 ymm register
VECTOR_BYTES = 32
LANES = {types.float32: VECTOR_BYTES // 4, types.float64: VECTOR_BYTES // 8}


def available() -> bool:
    """True if this CPU has AVX2 and FMA (the SIMD micro-kernels' instructions)."""
    import llvmlite.binding as ll

    features = ll.get_host_cpu_features()
    return bool(features.get("avx2") and features.get("fma"))


class Vector(types.Type):
    """A SIMD vector of ``lanes`` values of ``dtype``, held in one register."""

    def __init__(self, dtype, lanes: int):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vector({dtype} x {lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        be_type = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes)
        super().__init__(dmm, fe_type, be_type)


def _vector_of(dtype):
    return Vector(dtype, LANES[dtype]) if dtype in LANES else None


def _c_matrix(ary):
    return isinstance(ary, types.Array) and ary.ndim == 2 and ary.layout == "C" and ary.dtype in LANES


def _element_pointer(context, builder, aryty, ary_value, i, j, ity, jty):
    ary = context.make_array(aryty)(context, builder, ary_value)
    i = context.cast(builder, i, ity, types.intp)
    j = context.cast(builder, j, jty, types.intp)
    row = builder.mul(i, cgutils.unpack_tuple(builder, ary.strides, 2)[0])
    base = builder.gep(builder.bitcast(ary.data, ir.IntType(8).as_pointer()), [row])
    return builder.gep(builder.bitcast(base, ary.data.type), [j])


@intrinsic
def vload(typingctx, ary, i, j):
    """The ``lanes`` values ary[i, j:j + lanes] of a C-contiguous matrix (no bounds check)."""
    if not (_c_matrix(ary) and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None
    vty = _vector_of(ary.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], args[2],
                               sig.args[1], sig.args[2])
        vtype = context.get_value_type(vty)
        return builder.load(builder.bitcast(ptr, vtype.as_pointer()),
                            align=sig.args[0].dtype.bitwidth // 8)

    return vty(ary, i, j), codegen


@intrinsic
def vstore(typingctx, ary, i, j, v):
    """ary[i, j:j + lanes] = v."""
    if not (_c_matrix(ary) and isinstance(v, Vector) and v.dtype == ary.dtype):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], args[2],
                               sig.args[1], sig.args[2])
        vtype = context.get_value_type(sig.args[3])
        builder.store(args[3], builder.bitcast(ptr, vtype.as_pointer()),
                      align=sig.args[0].dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(ary, i, j, v), codegen


@intrinsic
def vbroadcast(typingctx, x):
    """A vector with every lane equal to the scalar x (float32 or float64)."""
    vty = _vector_of(x)
    if vty is None:
        return None

    def codegen(context, builder, sig, args):
        vtype = context.get_value_type(vty)
        one = builder.insert_element(ir.Constant(vtype, ir.Undefined), args[0], ir.IntType(32)(0))
        return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), vty.lanes), [0] * vty.lanes))

    return vty(x), codegen


@intrinsic
def vbroadcast_at(typingctx, ary, i, j):
    """A vector with every lane equal to ary[i, j] (no bounds check, no negative indices:
    Numba's own indexing would add wraparound code to every load of the inner loops)."""
    if not (_c_matrix(ary) and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
        return None
    vty = _vector_of(ary.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], args[2],
                               sig.args[1], sig.args[2])
        x = builder.load(ptr, align=sig.args[0].dtype.bitwidth // 8)
        vtype = context.get_value_type(vty)
        one = builder.insert_element(ir.Constant(vtype, ir.Undefined), x, ir.IntType(32)(0))
        return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), vty.lanes), [0] * vty.lanes))

    return vty(ary, i, j), codegen


@intrinsic
def vzeros(typingctx, like):
    """A zero vector of the dtype of the array ``like``."""
    vty = _vector_of(getattr(like, "dtype", None))
    if vty is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vty), None)

    return vty(like), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c lane by lane, rounded once (llvm.fma: one vfmadd instruction)."""
    if not (isinstance(a, Vector) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        vtype = context.get_value_type(sig.return_type)
        name = f"llvm.fma.v{sig.return_type.lanes}f{sig.return_type.dtype.bitwidth}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vtype, [vtype] * 3), name)
        return builder.call(fma, args)

    return a(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    """a + b lane by lane."""
    if not (isinstance(a, Vector) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b lane by lane."""
    if not (isinstance(a, Vector) and a == b):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vsum(typingctx, v):
    """The sum of the lanes, always in the same order: halves added pairwise."""
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, sig, args):
        x, width = args[0], v.lanes
        undef = ir.Constant(x.type, ir.Undefined)
        while width > 1:
            width //= 2
            # lanes [width, 2 width) onto [0, width)
            mask = [width + k if k < width else k for k in range(v.lanes)]
            upper = builder.shuffle_vector(x, undef, ir.Constant(ir.VectorType(ir.IntType(32), v.lanes), mask))
            x = builder.fadd(x, upper)
        return builder.extract_element(x, ir.IntType(32)(0))

    return v.dtype(v), codegen


@intrinsic
def lanes(typingctx, like):
    """The number of lanes of a vector of the dtype of the array ``like`` (a constant)."""
    vty = _vector_of(getattr(like, "dtype", None))
    if vty is None:
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, vty.lanes)

    return types.intp(like), codegen


@intrinsic
def prefetch(typingctx, ary, i, j):
    """Hint the CPU to bring the cache line of ary[i, j] into the caches (llvm.prefetch)."""
    if not (isinstance(ary, types.Array) and ary.ndim == 2 and ary.layout == "C"):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], args[2],
                               sig.args[1], sig.args[2])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        # read, high temporal locality (into L1), data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(ary, i, j), codegen


@intrinsic
def atomic_add(typingctx, counters, index, value):
    """counters[index] += value atomically (sequentially consistent); returns the old value.
    ``counters`` is a contiguous int64 array; no bounds check."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64
            and counters.ndim == 1 and counters.layout == "C"
            and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        inc = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", builder.gep(ary.data, [index]), inc, "seq_cst")

    return types.int64(counters, index, value), codegen
