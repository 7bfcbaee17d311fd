"""Arrays of other libraries in, the same kind out (lorakern._validate.as_array / returner), and
device names with a GPU index ("cuda:1"). Torch cases skip where torch is not installed;
the DLPack producer below stands in for any other library (JAX, ...)."""
from __future__ import annotations

import numpy as np
import pytest

import lorakern
from lorakern import _dispatch, _validate, reference
from lorakern._cuda import CudaDevice
from lorakern.testing import assert_bitwise, assert_close, random_linear_data

DTYPES = (np.float32, np.float64)


class Producer:
    """An array offering only DLPack (as a JAX array does), over a NumPy array."""

    def __init__(self, a, device=(_validate.KDL_CPU, 0)):
        self.a, self.device, self.streams = a, device, []

    def __dlpack__(self, stream=None, **kwargs):
        self.streams.append(stream)
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.device


def _linear(dtype, seed=0, N=13, n=7, m=5, r=3):
    rng = np.random.default_rng(seed)
    X, Y, W0 = random_linear_data(rng, N, n, m, dtype)
    B = (rng.standard_normal((m, r)) / 3).astype(dtype)
    A = (rng.standard_normal((r, n)) / 3).astype(dtype)
    return X, Y, W0, B, A


# ---- any DLPack producer, no torch needed ------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_dlpack_producer_in_numpy_out(dtype):
    """A Problem and adapters given as bare DLPack producers step exactly as NumPy arrays do;
    an unknown library's results come back as NumPy."""
    X, Y, W0, B, A = _linear(dtype, seed=1)
    want = lorakern.step(lorakern.LinearProblem(X, Y, W0), B, A, device="cpu", step_size="theorem")
    got = lorakern.step(lorakern.LinearProblem(Producer(X), Producer(Y), Producer(W0)),
                        Producer(B), Producer(A), device="cpu", step_size="theorem")
    assert isinstance(got.B, np.ndarray)
    assert_bitwise(got.B, want.B, "B")
    assert_bitwise(got.A, want.A, "A")
    assert got.eta == want.eta


def test_intake_is_a_read_only_view_without_a_copy():
    a = np.random.default_rng(2).standard_normal((6, 4))[:, ::2]  # strided: no copy either
    view = _validate.as_array("X", Producer(a))
    assert np.shares_memory(view, a) and not view.flags.writeable
    assert_bitwise(view, a, "X")


@pytest.mark.parametrize("value, words", [
    ([[1.0, 2.0]], ["W0 is a Python list", "np.asarray(W0, dtype=np.float32)"]),
    (((1.0, 2.0),), ["W0 is a Python tuple", "np.asarray(W0"]),
])
def test_lists_and_tuples_say_how_to_convert(value, words):
    Y = np.ones((1, 2))
    with pytest.raises(TypeError) as info:
        lorakern.Problem(value, Y)
    for w in words:
        assert w in str(info.value)


def test_dataframes_say_how_to_convert():
    """pandas objects are recognised by their module (pandas is not imported to check)."""
    DataFrame = type("DataFrame", (), {"__module__": "pandas.core.frame"})
    X, Y, W0, B, A = _linear(np.float64)
    with pytest.raises(TypeError, match=r"X is a pandas DataFrame; .*X\.to_numpy\(dtype="):
        lorakern.LinearProblem(DataFrame(), Y, W0)


def test_unreadable_device_is_named():
    X, Y, W0, B, A = _linear(np.float64)
    with pytest.raises(TypeError, match="DLPack device type 14"):
        lorakern.LinearProblem(Producer(X, device=(14, 0)), Y, W0)  # kDLOneAPI... not ours


def test_stream_handover_names_the_consumer_stream():
    """The DLPack stream argument: the consumer's pointer, the legacy default stream as 1."""
    assert _validate.dlpack_stream(0) == 1
    assert _validate.dlpack_stream(0x7F00) == 0x7F00
    p = Producer(np.zeros((2, 2)))
    handover = _validate.StreamHandover(p, _validate.dlpack_stream(0))
    handover.__dlpack__(stream=None)          # whatever the consumer passes,
    handover.__dlpack__(stream=99)            # the handover names its stream
    assert p.streams == [1, 1]
    assert handover.__dlpack_device__() == p.device


# ---- device names with an index ----------------------------------------------------------------
@pytest.mark.parametrize("name, parsed", [("cuda:1", ("cuda", 1)), ("cuda:0", ("cuda", 0)),
                                          ("cuda", ("cuda", None)), ("cpu", ("cpu", None))])
def test_parse_device(name, parsed):
    assert _dispatch.parse_device(name) == parsed


@pytest.mark.parametrize("name, error, words", [
    ("cuda:x", ValueError, "must be a non-negative integer"),
    ("cuda:-1", ValueError, "must be a non-negative integer"),
    ("cuda:", ValueError, "must be a non-negative integer"),
    ("cpu:0", ValueError, "device 'cpu' has no units"),
    ("gpu:0", ValueError, "unknown device 'gpu:0'"),
])
def test_bad_device_names(name, error, words):
    X, Y, W0, B, A = _linear(np.float64)
    with pytest.raises(error, match=words):
        lorakern.step(lorakern.LinearProblem(X, Y, W0), B, A, device=name, step_size="theorem")


def test_cuda_index_unavailable_here_is_clear():
    if "cuda" in lorakern.devices():
        pytest.skip("a GPU is available: the error path is checked by the next test")
    X, Y, W0, B, A = _linear(np.float64)
    with pytest.raises(lorakern.DeviceUnavailableError, match=r"device='cuda:1' \(GPU 1\)"):
        lorakern.step(lorakern.LinearProblem(X, Y, W0), B, A, device="cuda:1", step_size="theorem")
    with pytest.raises(lorakern.DeviceUnavailableError, match=r"device='cuda:0' \(GPU 0\)"):
        lorakern.step(lorakern.LinearProblem(X, Y, W0), B, A, device="cuda:0", step_size="theorem")


def test_cuda_index_past_the_gpus(monkeypatch):
    """With CUDA usable but one GPU, "cuda:1" names the GPUs there are; "cuda:0" is fine."""
    import lorakern._cuda as cuda

    monkeypatch.setattr(cuda, "check_available", lambda: None)
    monkeypatch.setattr(cuda, "gpu_count", lambda: 1)
    dev = cuda.DEVICE.on(1)
    assert isinstance(dev, CudaDevice) and dev.name == "cuda:1" and dev.ordinal == 1
    with pytest.raises(lorakern.DeviceUnavailableError, match="asks for GPU 1, but 1 GPU is"):
        dev.check_available()
    cuda.DEVICE.on(0).check_available()


# ---- torch tensors ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_in_torch_out(dtype):
    """Every public call takes CPU tensors and nn.Parameters; step, fit, reference.step and
    reference.gradient give tensors back, equal bit for bit to the NumPy route; the caller's
    tensors are untouched."""
    torch = pytest.importorskip("torch")
    X, Y, W0, B, A = _linear(dtype, seed=3)
    tX, tY, tW0 = torch.from_numpy(X.copy()), torch.from_numpy(Y.copy()), torch.from_numpy(W0.copy())
    tB, tA = torch.nn.Parameter(torch.from_numpy(B.copy())), torch.from_numpy(A.copy()).T.contiguous().T
    before = [t.detach().clone() for t in (tX, tY, tW0, tB, tA)]
    problem_np, problem_t = lorakern.LinearProblem(X, Y, W0), lorakern.LinearProblem(tX, tY, tW0)
    cases = [
        (lorakern.step(problem_np, B, A, device="cpu", step_size="theorem"), lorakern.step(problem_t, tB, tA, device="cpu", step_size="theorem")),
        (lorakern.fit(problem_np, B, A, steps=3, device="cpu", step_size="theorem"),
         lorakern.fit(problem_t, tB, tA, steps=3, device="cpu", step_size="theorem")),
        (reference.step(problem_np, B, A), reference.step(problem_t, tB, tA)),
    ]
    for want, got in cases:
        for name in ("B", "A"):
            value = getattr(got, name)
            assert isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
            assert value.device.type == "cpu" and value.dtype == tB.dtype
            assert_bitwise(value.numpy(), getattr(want, name), name)
    for t in (tX, tB, tA):  # read in place: the same memory, read-only, strides kept
        view = _validate.as_array("t", t)
        assert view.__array_interface__["data"][0] == t.data_ptr() and not view.flags.writeable
    G, J = reference.gradient(problem_t, tB, tA)
    assert isinstance(G, torch.Tensor)
    assert_close(G.numpy(), reference.gradient(problem_np, B, A)[0], np.float64, "G")
    for t, b in zip((tX, tY, tW0, tB, tA), before):
        assert torch.equal(t.detach(), b)


def test_torch_matrix_problem_and_init_adapters():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    W0, Y = rng.standard_normal((9, 8)), rng.standard_normal((9, 8))
    mask = rng.random((9, 8)) < 0.7
    B, A = lorakern.init_adapters(9, 8, 2, dtype=np.float64, seed=0, init="gaussian")
    tB, tA = lorakern.init_adapters(9, 8, 2, dtype=np.float64, seed=0, init="gaussian",
                                    like=torch.zeros(1))
    assert isinstance(tB, torch.Tensor) and np.array_equal(tB.numpy(), B)
    for not_an_array in (torch.device("cpu"), torch.float64, 3):  # like= names an array
        with pytest.raises(TypeError, match="like must be None or an array"):
            lorakern.init_adapters(9, 8, 2, dtype=np.float64, like=not_an_array)
    want = lorakern.step(lorakern.Problem(W0, Y, mask=mask), B, A, device="cpu", step_size="theorem")
    got = lorakern.step(lorakern.Problem(torch.from_numpy(W0), torch.from_numpy(Y),
                                         mask=torch.from_numpy(mask)), tB, tA, device="cpu", step_size="theorem")
    assert_bitwise(got.B.numpy(), want.B, "B")


def test_torch_cross_entropy_labels_and_errors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    X, labels, W0 = random_linear_data(rng, 11, 6, 4, np.float32, loss="cross_entropy")
    problem = lorakern.LinearProblem(torch.from_numpy(X), torch.from_numpy(labels),
                                     torch.from_numpy(W0), loss="cross_entropy")
    assert problem.Y.dtype == np.int64
    with pytest.raises(TypeError, match="float16"):
        lorakern.LinearProblem(torch.from_numpy(X).half(), torch.from_numpy(labels),
                               torch.from_numpy(W0), loss="cross_entropy")


def test_torch_certified_fit_stopped_by_its_callback():
    """Tensors through the certified step, stopped by a callback: tensors out, the same bits
    as the NumPy fit of as many steps, the caller's tensors untouched, the run certified."""
    torch = pytest.importorskip("torch")
    X, Y, W0, B, A = _linear(np.float64, seed=10)
    problem = lorakern.LinearProblem(torch.from_numpy(X), torch.from_numpy(Y),
                                     torch.from_numpy(W0))
    tB, tA = torch.from_numpy(B.copy()), torch.from_numpy(A.copy())
    got = lorakern.fit(problem, tB, tA, steps=20, device="cpu", step_size="certified",
                       callback=lambda info: info.t == 4 and isinstance(info.B, torch.Tensor))
    assert got.status == "stopped" and got.steps == 4
    assert isinstance(got.B, torch.Tensor) and isinstance(got.A, torch.Tensor)
    want = lorakern.fit(lorakern.LinearProblem(X, Y, W0), B, A, steps=4, device="cpu",
                        step_size="certified")
    assert_bitwise(got.B.numpy(), want.B, "B")
    assert_bitwise(got.A.numpy(), want.A, "A")
    assert torch.equal(tB, torch.from_numpy(B)) and torch.equal(tA, torch.from_numpy(A))
    assert lorakern.theory.check(got).all_hold


def test_torch_device_objects_are_taken_by_name():
    """device=tensor.device works as its name does: torch.device("cpu") is "cpu", a CUDA
    one is "cuda:<i>" (unavailable here without CuPy, said so), another is unknown."""
    torch = pytest.importorskip("torch")
    X, Y, W0, B, A = _linear(np.float64, seed=9)
    problem = lorakern.LinearProblem(X, Y, W0)
    tB, tA = torch.from_numpy(B), torch.from_numpy(A)
    got = lorakern.step(problem, tB, tA, device=tB.device, step_size="theorem")
    assert_bitwise(got.B.numpy(), lorakern.step(problem, B, A, device="cpu", step_size="theorem").B, "B")
    with pytest.raises(ValueError, match="unknown device 'meta'"):
        lorakern.step(problem, tB, tA, device=torch.device("meta"), step_size="theorem")
    if "cuda" not in lorakern.devices():
        with pytest.raises(lorakern.DeviceUnavailableError, match=r"device='cuda:1' \(GPU 1\)"):
            lorakern.step(problem, tB, tA, device=torch.device("cuda", 1), step_size="theorem")


def test_torch_dtype_errors_say_the_torch_conversion():
    """A tensor of the wrong dtype is told how to convert it in torch (``.to``: a tensor has
    no ``astype``), and nothing of the caller's is changed; a list is told the problem's
    dtype."""
    torch = pytest.importorskip("torch")
    X, Y, W0, B, A = _linear(np.float64, seed=8)
    problem = lorakern.LinearProblem(X, Y, W0)
    tB, tA = torch.from_numpy(B).float(), torch.from_numpy(A)
    before = tB.clone()
    with pytest.raises(TypeError, match=r"B has dtype float32 .*B\.to\(torch\.float64\)"):
        lorakern.fit(problem, tB, tA, steps=2, device="cpu", step_size="theorem")
    assert torch.equal(tB, before)
    with pytest.raises(TypeError, match=r"A\.to\(torch\.float64\)"):
        lorakern.merge(torch.from_numpy(W0), torch.from_numpy(B), tA.float())
    with pytest.raises(TypeError, match=r"Y\.to\(torch\.float64\)"):
        lorakern.LinearProblem(torch.from_numpy(X), torch.from_numpy(Y).float(), W0)
    with pytest.raises(TypeError, match=r"Y\.to\(torch\.float64\)"):
        lorakern.Problem(torch.from_numpy(W0), torch.from_numpy(W0).float())
    with pytest.raises(TypeError, match=r"np\.asarray\(B, dtype=np\.float64\)"):
        lorakern.step(problem, B.tolist(), A, device="cpu", step_size="theorem")
    with pytest.raises(TypeError, match=r"B\.astype\(np\.float64\)"):  # NumPy: astype
        lorakern.step(problem, B.astype(np.float32), A, device="cpu", step_size="theorem")


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_cuda_in_cuda_out(dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or "cuda" not in lorakern.devices():
        pytest.skip("needs a CUDA GPU visible to both PyTorch and CuPy")
    X, Y, W0, B, A = _linear(dtype, seed=6)
    want = lorakern.step(lorakern.LinearProblem(X, Y, W0), B, A, device="cpu", step_size="theorem")
    dev = torch.device("cuda:0")
    t = [torch.from_numpy(a).to(dev) for a in (X, Y, W0, B, A)]
    got = lorakern.step(lorakern.LinearProblem(*t[:3]), t[3], t[4], step_size="theorem")  # device="auto": cuda:0
    assert got.B.device == dev and got.A.device == dev
    assert_close(got.B.cpu().numpy(), want.B, dtype, "B")
    got = lorakern.step(lorakern.LinearProblem(*t[:3]), t[3], t[4], device="cpu", step_size="theorem")
    assert got.B.device == dev  # results go back to the input's device


def test_torch_fit_callback_and_merge():
    """fit's callback sees tensors when tensors came in; merge takes and gives tensors."""
    torch = pytest.importorskip("torch")
    X, Y, W0, B, A = _linear(np.float64, seed=7)
    problem = lorakern.LinearProblem(X, Y, W0)
    seen = []
    result = lorakern.fit(problem, torch.from_numpy(B), torch.from_numpy(A), steps=4,
                          device="cpu", callback=lambda info: seen.append(type(info.B)),
                          callback_every=2, step_size="theorem")
    assert seen and all(kind is torch.Tensor for kind in seen)
    merged = lorakern.merge(torch.from_numpy(W0), result.B, result.A)
    assert isinstance(merged, torch.Tensor)
    assert_bitwise(merged.numpy(), W0 + result.B.numpy() @ result.A.numpy(), "merged")
    assert isinstance(result.merged(), torch.Tensor)
