"""cupyconvt.torch: the custom ops, their autograd, and the drop-in ConvTranspose3d layer.

CPU tensors here (the NumPy backend); the tests marked ``gpu`` at the end run CUDA tensors
through the CuPy backend and skip without a GPU.
"""

from __future__ import annotations

import copy
import importlib
import io

import pytest
from cases import CASES
from conftest import need
from oracle import TOL, rel_err

from cupyconvt import _backward_cpu

torch = need("torch", "torch")
ct = importlib.import_module("cupyconvt.torch")

DTYPES = ["float64", "float32", "float16", "bfloat16"]

# (name, x shape, w shape, has bias, kwargs): small enough for gradcheck's numerical Jacobians.
GRADCHECK_PROBLEMS = [
    ("plain", (2, 3, 3, 4, 3), (3, 2, 2, 3, 2), True, {}),
    ("strided_padded", (1, 2, 3, 3, 4), (2, 3, 3, 3, 2), True,
     dict(stride=2, padding=1, output_padding=1)),
    ("grouped_dilated", (2, 4, 3, 2, 3), (4, 1, 2, 2, 3), False,
     dict(groups=2, dilation=(2, 1, 2), stride=(1, 2, 1), padding=(1, 0, 0),
          output_padding=(1, 1, 0))),
    ("depthwise", (1, 3, 3, 3, 3), (3, 1, 3, 3, 3), True, dict(groups=3, stride=2, padding=1)),
    ("unbatched", (2, 3, 3, 3), (2, 2, 2, 2, 2), True, dict(stride=(2, 1, 3))),
]  # fmt: skip

# Constructor arguments of layers compared with torch.nn.ConvTranspose3d.
LAYERS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=(2, 3, 4), groups=4, bias=False,
         dilation=(1, 2, 1)),
    dict(in_channels=6, out_channels=3, kernel_size=2, stride=(2, 1, 2), groups=3,
         padding=(0, 1, 0)),
]  # fmt: skip


def _np(t):
    """float64 NumPy copy of a tensor (any dtype or device)."""
    return t.detach().double().cpu().numpy()


def _bias(w, groups, has_bias, dtype=torch.float64, device="cpu"):
    if not has_bias:
        return None
    g = torch.Generator().manual_seed(1)
    b = torch.randn(w.shape[1] * groups, generator=g, dtype=torch.float64)
    return b.to(dtype=dtype, device=device).requires_grad_()


def _inputs(problem, dtype=torch.float64, device="cpu"):
    _, xs, ws, has_bias, kw = problem
    g = torch.Generator().manual_seed(0)
    x = torch.randn(xs, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    w = torch.randn(ws, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    b = _bias(w, kw.get("groups", 1), has_bias, dtype, device)
    return x.requires_grad_(), w.requires_grad_(), b


@pytest.mark.parametrize("problem", GRADCHECK_PROBLEMS, ids=lambda p: p[0])
def test_gradcheck_functional(problem):
    x, w, b = _inputs(problem)
    kw = problem[4]

    def f(*args):
        return ct.conv_transpose3d(*args, **kw)

    args = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("problem", GRADCHECK_PROBLEMS[1:3], ids=lambda p: p[0])
def test_gradgradcheck_functional(problem):
    """Double backward (the backward op's own autograd)."""
    x, w, b = _inputs(problem)
    kw = problem[4]
    args = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradgradcheck(lambda *a: ct.conv_transpose3d(*a, **kw), args)


def test_gradcheck_layer():
    """gradcheck through the layer's forward, with respect to the input and both parameters."""
    layer = ct.ConvTranspose3d(4, 6, (3, 2, 3), stride=(2, 1, 2), padding=(1, 0, 1),
                               output_padding=(1, 0, 0), groups=2, dtype=torch.float64)  # fmt: skip
    x = torch.randn(2, 4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, weight, bias))


def _pair(cfg, dtype, seed=0):
    """torch's layer and ours, with the same parameters."""
    torch.manual_seed(seed)
    ref = torch.nn.ConvTranspose3d(**cfg, dtype=dtype)
    ours = ct.ConvTranspose3d(**cfg, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("cfg", LAYERS, ids=["strided", "depthwise_dilated", "grouped"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_match_torch_layer(cfg, dtype):
    """Output and the three gradients against torch's layer run in float64 on the same values."""
    tdt = getattr(torch, dtype)
    ref, ours = _pair(cfg, tdt)
    x = torch.randn(2, cfg["in_channels"], 4, 5, 3).to(tdt).requires_grad_()
    y = ours(x)
    gy = torch.randn(y.shape).to(tdt)
    y.backward(gy)
    ref64 = copy.deepcopy(ref).double()
    x64 = x.detach().double().requires_grad_()
    y64 = ref64(x64)
    y64.backward(gy.double())
    pairs = [(y, y64), (x.grad, x64.grad), (ours.weight.grad, ref64.weight.grad)]
    if cfg.get("bias", True):
        pairs.append((ours.bias.grad, ref64.bias.grad))
    for got, want in pairs:
        assert got.dtype == tdt and got.shape == want.shape
        err = rel_err(_np(got), _np(want))
        assert err <= TOL[dtype], err


@pytest.mark.parametrize("cfg", LAYERS, ids=["strided", "depthwise_dilated", "grouped"])
def test_same_initialisation_as_torch(cfg):
    """Same seed, same parameters: the initialisation is torch's own (reset_parameters)."""
    for seed in (0, 1):
        ref, _ = _pair(cfg, torch.float32, seed)
        torch.manual_seed(seed)
        ours = ct.ConvTranspose3d(**cfg)
        assert isinstance(ours, torch.nn.ConvTranspose3d)
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
        for (_, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
            assert a.shape == b.shape and torch.equal(a, b)
    assert repr(ours).removeprefix("ConvTranspose3d") == repr(ref).removeprefix("ConvTranspose3d")


def test_state_dict_round_trip_both_ways():
    cfg = LAYERS[0]
    torch.manual_seed(3)
    ref = torch.nn.ConvTranspose3d(**cfg)
    ours = ct.ConvTranspose3d(**cfg)
    assert not torch.equal(ours.weight, ref.weight)
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)  # a checkpoint written by torch's layer
    buffer.seek(0)
    result = ours.load_state_dict(torch.load(buffer))
    assert not result.missing_keys and not result.unexpected_keys
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    pairs = zip(ours.state_dict().values(), ref.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    back = torch.nn.ConvTranspose3d(**cfg)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4, 3, 4, 5)
    assert torch.equal(back(x), ref(x))
    assert rel_err(_np(ours(x)), _np(ref(x))) <= TOL["float32"]


@pytest.mark.parametrize("output_size", [(9, 9, 9), (10, 9, 10), [1, 6, 10, 10, 9], None])
def test_output_size(output_size):
    """``output_size=`` picks the output padding as torch's layer does."""
    ref, ours = _pair(dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
                      torch.float64)  # fmt: skip
    x = torch.randn(1, 4, 5, 5, 5, dtype=torch.float64)
    y, want = ours(x, output_size=output_size), ref(x, output_size=output_size)
    assert y.shape == want.shape
    assert rel_err(_np(y), _np(want)) <= TOL["float64"]


def test_output_size_out_of_range_raises_as_torch():
    ref, ours = _pair(dict(in_channels=2, out_channels=2, kernel_size=3, stride=2), torch.float32)
    x = torch.randn(1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match=r"requested an output size of \[9, 7, 7\]") as err:
        ours(x, output_size=[9, 7, 7])
    with pytest.raises(ValueError) as err_ref:
        ref(x, output_size=[9, 7, 7])
    assert str(err.value) == str(err_ref.value)


def test_padding_mode_other_than_zeros_is_rejected():
    with pytest.raises(ValueError, match='Only "zeros" padding mode is supported for'):
        ct.ConvTranspose3d(2, 2, 3, padding_mode="reflect")
    layer = ct.ConvTranspose3d(2, 2, 3)
    layer.padding_mode = "circular"
    with pytest.raises(ValueError, match="Only `zeros` padding mode is supported"):
        layer(torch.randn(1, 2, 3, 3, 3))


def test_unbatched_and_channels_last():
    ref, ours = _pair(LAYERS[0], torch.float64)
    for x in (torch.randn(4, 3, 4, 5, dtype=torch.float64),
              torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
              .to(memory_format=torch.channels_last_3d)):  # fmt: skip
        x = x.requires_grad_()
        y = ours(x)
        if x.dim() == 5:
            assert y.is_contiguous(memory_format=torch.channels_last_3d)
        gy = torch.randn(y.shape, dtype=torch.float64)
        y.backward(gy)
        x_ref = x.detach().clone().requires_grad_()
        y_ref = ref(x_ref)
        y_ref.backward(gy)
        assert y.shape == y_ref.shape and x.grad.shape == x.shape
        pairs = [(y, y_ref), (x.grad, x_ref.grad), (ours.weight.grad, ref.weight.grad),
                 (ours.bias.grad, ref.bias.grad)]  # fmt: skip
        for got, want in pairs:
            assert rel_err(_np(got), _np(want)) <= TOL["float64"]
        for m in (ours, ref):
            m.zero_grad()


def test_only_needed_gradients_are_computed(monkeypatch):
    """The backward asks only for the gradients autograd needs (the output mask)."""

    def boom(*args, **kwargs):
        raise AssertionError("a gradient nobody needs was computed")

    layer = ct.ConvTranspose3d(2, 3, 3, stride=2, dtype=torch.float64)
    x = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64)
    with monkeypatch.context() as m:  # x needs no gradient: grad_input is never computed
        m.setattr(_backward_cpu, "grad_input", boom)
        m.setattr(_backward_cpu, "input_and_weight", boom)
        layer(x).sum().backward()
    assert x.grad is None and layer.weight.grad is not None and layer.bias.grad is not None
    layer.requires_grad_(False)
    x.requires_grad_()
    with monkeypatch.context() as m:  # frozen layer: only grad_input
        m.setattr(_backward_cpu, "grad_weight", boom)
        m.setattr(_backward_cpu, "grad_bias", boom)
        m.setattr(_backward_cpu, "input_and_weight", boom)
        layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def _model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        ct.ConvTranspose3d(4, 4, 2, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, 3, 3, padding=1),
        ct.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1),
    ).to(dtype=dtype, device=device)


def _ours_only(device="cuda"):
    """Our layers alone (torch's cuDNN Conv3d backward is not deterministic): results compare
    bitwise."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        ct.ConvTranspose3d(4, 6, 2, stride=2),
        torch.nn.ReLU(),
        ct.ConvTranspose3d(6, 2, 3, stride=2, padding=1, output_padding=1, groups=2),
    ).to(device)


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


def test_torch_compile_fullgraph_traces_both_ops():
    """torch.compile(fullgraph=True): no graph break; our forward op lands in the forward graph
    and our backward op in the backward graph (traced through the fake impls); same numbers as
    eager. Static shapes, then dynamic ones. AOTAutograd with the eager compilers keeps this
    fast; test_torch_compile_cuda runs Inductor."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: dict[str, set[str]] = {}

    def recorder(name):
        def compiler(gm, example_inputs):
            graphs[name] = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    model = _model()
    for dynamic in (False, True):
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=dynamic)
        for shape in ((2, 4, 3, 4, 3), (1, 4, 4, 3, 5)):
            x = torch.randn(shape)
            got, want = _loss_and_grads(compiled, x), _loss_and_grads(model, x)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert "cupyconvt.conv_transpose3d.default" in graphs["forward"]
        assert "cupyconvt.conv_transpose3d_backward.default" in graphs["backward"]


def test_compile_time_errors_match_eager():
    """The fake impl raises the eager message while tracing (static shapes)."""
    x, w = torch.randn(1, 4, 3, 3, 3), torch.randn(4, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="groups=3 must divide C_in=4"):
        ct.conv_transpose3d(x, w, groups=3)
    compiled = torch.compile(lambda x, w: ct.conv_transpose3d(x, w, groups=3), backend="eager",
                             fullgraph=True)  # fmt: skip
    with pytest.raises(RuntimeError, match="groups=3 must divide C_in=4"):
        compiled(x, w)


OPCHECK = [
    ("forward", lambda: _op_args(GRADCHECK_PROBLEMS[2], None)),
    ("forward_bias_unbatched", lambda: _op_args(GRADCHECK_PROBLEMS[4], None)),
    ("forward_channels_last", lambda: _op_args(GRADCHECK_PROBLEMS[1], None, channels_last=True)),
    ("backward_all", lambda: _op_args(GRADCHECK_PROBLEMS[1], [True, True, True])),
    ("backward_input_bias", lambda: _op_args(GRADCHECK_PROBLEMS[2], [True, False, True])),
    ("backward_weight_unbatched", lambda: _op_args(GRADCHECK_PROBLEMS[4], [False, True, False])),
]


def _op_args(problem, mask, channels_last=False):
    x, w, b = _inputs(problem, torch.float32)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
    kw = problem[4]
    conv = [list(ct._list3(n, kw.get(n, d))) for n, d in
            (("stride", 1), ("padding", 0), ("output_padding", 0))]  # fmt: skip
    groups, dilation = kw.get("groups", 1), ct._list3("dilation", kw.get("dilation", 1))
    if mask is None:
        return torch.ops.cupyconvt.conv_transpose3d.default, (x, w, b, *conv, groups, dilation)
    gy = torch.randn(ct.conv_transpose3d(x, w, None, *conv, groups, dilation).shape)
    args = (gy, x, w, *conv, groups, dilation, mask)
    return torch.ops.cupyconvt.conv_transpose3d_backward.default, args


@pytest.mark.parametrize("make", [m for _, m in OPCHECK], ids=[n for n, _ in OPCHECK])
def test_opcheck(make):
    """Schema, fake impl (strides included), autograd registration and AOT dispatch."""
    op, args = make()
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def test_functional_errors():
    x = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="stride must be an int or a sequence of 3 ints"):
        ct.conv_transpose3d(x, w, stride=(1, 2))
    with pytest.raises(TypeError, match="w has dtype float32 but x has dtype float64"):
        ct.conv_transpose3d(x, w.float())
    with pytest.raises(ValueError, match=r"output_padding\[2\]=1 must be smaller"):
        ct.conv_transpose3d(x, w, output_padding=(0, 0, 1))


# --- CUDA tensors (the CuPy backend on torch's stream) --------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("problem", GRADCHECK_PROBLEMS, ids=lambda p: p[0])
def test_cuda_gradcheck(problem):
    x, w, b = _inputs(problem, device="cuda")
    kw = problem[4]
    args = (x, w) if b is None else (x, w, b)
    f = lambda *a: ct.conv_transpose3d(*a, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    if problem[0] == "grouped_dilated":
        assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_float64_reference(case, dtype, rng):
    """Every parameter family and dtype: output and gradients against torch's float64 autograd
    (CPU) on the same rounded values; a second run is bitwise identical."""
    tdt = getattr(torch, dtype)
    x, w, b = (None if a is None else torch.from_numpy(a).to(tdt) for a in case.arrays(rng))
    y_shape = ct.conv_transpose3d(x[:1] if x.dim() == 5 else x, w, None, **case.kwargs).shape
    gy = torch.from_numpy(rng.standard_normal((*x.shape[:-4], *y_shape[-4:]))).to(tdt)

    def run(device, dt):
        xs, ws = (t.to(device, dt).detach().requires_grad_() for t in (x, w))
        bs = None if b is None else b.to(device, dt).detach().requires_grad_()
        if device == "cpu":
            y = torch.nn.functional.conv_transpose3d(xs, ws, bs, **case.kwargs)
        else:
            y = ct.conv_transpose3d(xs, ws, bs, **case.kwargs)
        y.backward(gy.to(device, dt))
        return [y.detach(), xs.grad, ws.grad] + ([] if bs is None else [bs.grad])

    want = run("cpu", torch.float64)
    got = run("cuda", tdt)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == tdt and g.device.type == "cuda" and g.shape == r.shape
        err = rel_err(_np(g), _np(r))
        assert err <= TOL[dtype], f"{case} {dtype}: rel err {err}"
    again = run("cuda", tdt)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


@pytest.mark.gpu
def test_cuda_bitwise_reproducible():
    """A layer big enough for multi-block reductions: gradients bitwise equal over runs."""
    layer = ct.ConvTranspose3d(32, 16, 3, stride=2, padding=1, output_padding=1).cuda()
    x = torch.randn(2, 32, 12, 12, 12, device="cuda")
    first = _loss_and_grads(layer, x)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, _loss_and_grads(layer, x), strict=True))


@pytest.mark.gpu
def test_cuda_side_stream_matches_default_stream():
    model = _ours_only()
    x = torch.randn(2, 4, 5, 6, 5, device="cuda")
    want = _loss_and_grads(model, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _loss_and_grads(model, x)
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.gpu
def test_cuda_graph_capture_forward_and_backward():
    """Whole-step capture (torch.cuda.graph): replays give the eager results for new inputs."""
    model = _ours_only()
    eager = copy.deepcopy(model)
    static_x = torch.randn(2, 4, 5, 6, 5, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: plans and kernels exist before capture
        for _ in range(3):
            _loss_and_grads(model, static_x)
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.square().mean().backward()
    for seed in range(3):
        torch.manual_seed(seed)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        want = _loss_and_grads(eager, static_x)
        got = [static_y] + [p.grad for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(got, [want[0], *want[2:]], strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_cuda(mode):
    """Inductor, fullgraph, on CUDA; "reduce-overhead" replays the step as a CUDA graph."""
    torch._dynamo.reset()
    model = _model(device="cuda")
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for seed in range(3):
        torch.manual_seed(seed)
        # A size no other test uses: the first call of a problem builds its plans (small device
        # tables kept for the process) inside the compiled step, as a user's first step would.
        x = torch.randn(2, 4, 5, 7, 3, device="cuda")
        got = [t.clone() for t in _loss_and_grads(compiled, x)]
        want = _loss_and_grads(model, x)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_float32_follows_process_precision():
    """The ops read cupyconvt's default precision at each call (torch's setting is not used)."""
    import cupyconvt

    x = torch.randn(2, 16, 6, 6, 6, device="cuda", requires_grad=True)
    w = torch.randn(16, 8, 3, 3, 3, device="cuda", requires_grad=True)
    try:
        for precision in ("medium", "highest"):
            cupyconvt.set_float32_matmul_precision(precision)
            x.grad = w.grad = None
            y = ct.conv_transpose3d(x, w, stride=2)
            gy = torch.ones_like(y)
            y.backward(gy)
            assert torch.equal(y, cupyconvt.conv_transpose3d(x.detach(), w.detach(), stride=2,
                                                             precision=precision))  # fmt: skip
            g = cupyconvt.conv_transpose3d_backward(gy, x.detach(), w.detach(), stride=2,
                                                    needs=("input", "weight"),
                                                    precision=precision)  # fmt: skip
            assert torch.equal(x.grad, g.grad_input) and torch.equal(w.grad, g.grad_weight)
    finally:
        cupyconvt.set_float32_matmul_precision("highest")
