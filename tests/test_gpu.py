"""GPU tests of the CUDA backends, Triton and the CUDA C++ kernels, with one test body for both (marked gpu;
skipped without a CUDA device): against the reference in fp32/bf16/fp16, gradcheck in fp64, drop-in module
steps with running statistics, bitwise determinism, a tensor with more than 2**31 elements,
torch.compile(fullgraph=True) through the ops, CUDA graph capture, the SyncBN ops, the direct path, and the two
backends against each other on the same inputs.

A test that takes a backend runs it through the dispatcher: FUSEDRECT_BACKEND names it, so the ops' CUDA
router picks it (test_gpu_direct_path covers the other way in)."""
import pytest
import torch

import fusedrect
from conftest import (ACTIVATIONS, LAYOUTS, fused_call, fused_forward_backward, fused_module, make_input,
                      make_params, torch_modules)
from fusedrect import reference
from fusedrect.ops import _backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GPU_BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(_backend.why_unavailable(b, torch.device("cuda")) is not None,
                                             reason=f"backend {b!r} is not available"))
    for b in _backend.CUDA_BACKENDS
]


@pytest.fixture(autouse=True)
def _routed(request, monkeypatch):
    """The ops' CUDA router runs the test's backend."""
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get("backend")
    if backend in _backend.CUDA_BACKENDS:
        monkeypatch.setenv(_backend.ENV_VAR, backend)
SHAPES = [(32, 64, 56, 56), (8, 3, 7, 7), (4, 33, 1, 1), (64, 1000), (2, 17, 3, 5, 7)]


def run(x, params, grad, training, backend):
    running = (None, None) if training else (torch.zeros(x.shape[1], device=x.device),
                                             torch.ones(x.shape[1], device=x.device))
    return fused_forward_backward(x, params, grad, training, backend, running)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_matches_reference(shape, layout, activation, dtype, training, backend):
    x = make_input(shape, layout, dtype, scale=2.0, shift=1.0).cuda()
    params = [p.float().cuda() if p is not None else None for p in make_params(shape[1], activation)]
    grad = torch.randn(shape, device="cuda").to(dtype)
    ours = run(x, params, grad, training, backend)
    exact = run(x.double(), [p.double() if p is not None else None for p in params], grad.double(), training,
                "reference")
    theirs = run(x, params, grad, training, "reference")  # PyTorch's own ops in the same dtype
    for got, want, baseline in zip(ours, exact, theirs):
        err = (got.double() - want).abs().max().item()
        atol = (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, want.abs().max().item())
        assert err <= 2 * (baseline.double() - want).abs().max().item() + atol


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_gradcheck(layout, activation, backend):
    x = make_input((3, 4, 3, 3), layout, torch.float64).cuda().requires_grad_()
    params = [p.cuda().requires_grad_() if p is not None else None for p in make_params(4, activation)]

    def fn(x, weight, bias, *slope):
        return fused_call(x, None, None, weight, bias, slope[0] if slope else None, True, backend)

    assert torch.autograd.gradcheck(fn, (x, *[p for p in params if p is not None]), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_module_steps_match_pytorch(activation, backend):
    bn, act = torch_modules(16, 4, activation, device="cuda")
    plain = torch.nn.Sequential(bn, act)
    fused = fused_module(16, activation, device="cuda", backend=backend)
    for step in range(3):
        x = make_input((8, 16, 9, 9), "channels_last" if step % 2 else "nchw", shift=float(step)).cuda()
        torch.testing.assert_close(fused(x), plain(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.running_mean, bn.running_mean)
    torch.testing.assert_close(fused.running_var, bn.running_var)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_bitwise_deterministic(layout, dtype, backend):
    x = make_input((32, 128, 28, 28), layout, dtype, scale=3.0).cuda()
    params = [p.float().cuda() for p in make_params(128, "prelu")]
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    first = run(x, params, grad, True, backend)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, run(x, params, grad, True, backend)))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_more_than_2_31_elements(backend):
    """64-bit offsets: 2 channels of 2**30 + 3 elements each (bf16, 4 GiB per tensor)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n = 2**30 + 3
    x = torch.randn(1, 2, n, device="cuda", dtype=torch.bfloat16)
    slope = torch.tensor([0.1, 0.2], device="cuda")
    y, mean, invstd = torch.ops.fusedrect.bn_act_fwd_train(x, None, None, slope, 1e-5)
    xf = x.float()
    torch.testing.assert_close(mean, xf.mean(dim=(0, 2)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(invstd, torch.rsqrt(xf.var(dim=(0, 2), unbiased=False) + 1e-5), atol=1e-4, rtol=1e-4)
    for index in (0, n // 2, n - 1):
        z = (xf[0, :, index] - mean) * invstd
        torch.testing.assert_close(y[0, :, index].float(), torch.where(z > 0, z, slope * z), atol=2e-2, rtol=1e-2)
    del xf
    dx, dw, db, ds = torch.ops.fusedrect.bn_act_bwd(torch.ones_like(x), x, mean, invstd, None, None, slope, True)
    assert torch.isfinite(dx[0, :, -1].float()).all() and torch.isfinite(ds).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_compile_fullgraph(activation, backend):
    torch._dynamo.reset()
    fused = fused_module(32, activation, device="cuda", backend=backend)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(8, 32, 14, 14, device="cuda", requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    expected = reference.bn_act_train(x.detach().double(), fused.weight.double(), fused.bias.double(),
                                      None if activation == "relu" else fused.slope.double())[0]
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=1e-4)
    assert fusedrect.build_info()["compiled"]


def captured(fn):
    """``fn`` captured in a CUDA graph after two runs on a side stream, and what the capture returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_cuda_graph_replays_match_plain_steps(layout, momentum, backend):
    """Training steps (forward, backward, running statistics; momentum=None keeps its count on the device) and an
    eval forward replayed from CUDA graphs give bitwise what the same steps give run one by one: nothing in them
    reads a value back to the host or synchronises."""
    modules = []
    for _ in range(2):
        torch.manual_seed(0)
        modules.append(fusedrect.FusedBNPReLU(16, momentum=momentum, backend=backend).cuda())
    graphed, plain = modules
    batches = [make_input((8, 16, 9, 9), layout, shift=float(i)).cuda() for i in range(5)]
    grad = make_input((8, 16, 9, 9), layout).cuda()
    static = batches[0].clone().requires_grad_()

    def train_step(module, x):
        x.grad = None
        module(x).backward(grad)
        return x.grad

    def eval_step(module, x):
        with torch.no_grad():
            return module.eval()(x)

    graph, static_grad = captured(lambda: train_step(graphed.train(), static))  # two steps on batch 0
    for _ in range(2):
        train_step(plain.train(), batches[0].clone().requires_grad_())
    for x in batches[1:3]:
        static.detach().copy_(x)
        graph.replay()
        assert torch.equal(static_grad, train_step(plain.train(), x.clone().requires_grad_()))
    for name in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias", "slope"):
        got, want = getattr(graphed, name), getattr(plain, name)
        assert torch.equal(got, want), name
        if isinstance(got, torch.nn.Parameter):
            assert torch.equal(got.grad, want.grad), name
    graph, static_out = captured(lambda: eval_step(graphed, static))
    for x in batches[3:]:
        static.detach().copy_(x)
        graph.replay()
        assert torch.equal(static_out, eval_step(plain, x))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_memory_efficient_matches_default(layout, dtype, backend):
    x = make_input((8, 32, 14, 14), layout, dtype, scale=2.0).cuda()
    weight, bias, slope = (p.float().cuda() for p in make_params(32, "prelu"))
    slope += 0.05
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    results = []
    for memory_efficient in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, slope)]
        y = fusedrect.bn_prelu(leaves[0], None, None, *leaves[1:], training=True, backend=backend,
                               memory_efficient=memory_efficient)
        y.backward(grad)
        results.append([y, *(t.grad for t in leaves)])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


def tolerance(dtype):
    return {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (1e-3, 2e-3)}[dtype]


@pytest.mark.skipif(any(_backend.why_unavailable(b, torch.device("cuda")) for b in _backend.CUDA_BACKENDS),
                    reason="needs both CUDA backends")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gpu_cuda_matches_triton(shape, layout, activation, dtype, training):
    """The two implementations on the same inputs: the same numbers up to summation order."""
    x = make_input(shape, layout, dtype, scale=2.0, shift=1.0).cuda()
    params = [p.float().cuda() if p is not None else None for p in make_params(shape[1], activation)]
    grad = torch.randn(shape, device="cuda").to(dtype)
    triton_results = run(x, params, grad, training, "triton")
    cuda_results = run(x, params, grad, training, "cuda")
    atol, rtol = tolerance(dtype)
    for got, want in zip(cuda_results, triton_results):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.float(), want.float(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 33, 9, 9), (64, 1000), (4, 16, 7, 7)], ids=str)
def test_gpu_syncbn_ops_match_the_fused_backward(shape, layout, activation, dtype, backend):
    """bn_stats, bn_act_bwd_reduce and bn_act_bwd_elemt (with this rank's count) against the reference
    statistics and the one-call backward."""
    if backend == "triton":
        from fusedrect.kernels import bn_act as kernels

        if not hasattr(kernels, "bn_stats"):
            pytest.skip("the Triton launchers of the SyncBN ops are not there yet")
    ops = torch.ops.fusedrect
    x = make_input(shape, layout, dtype, scale=2.0, shift=1.0).cuda()
    weight, bias, slope = (p.float().cuda() if p is not None else None for p in make_params(shape[1], activation))
    grad = torch.randn_like(x)  # the ops take grad_out in the input's layout (the module path converts it)
    mean, var = ops.bn_stats(x)
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(mean, x.double().mean(dims).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, x.double().var(dims, unbiased=False).float(), atol=1e-5, rtol=1e-5)
    invstd = torch.rsqrt(var + 1e-5)
    sums = ops.bn_act_bwd_reduce(grad, x, mean, invstd, weight, bias, slope)
    dx, dweight, dbias, dslope = ops.bn_act_bwd(grad, x, mean, invstd, weight, bias, slope, True)
    for got, want in zip(sums, (dbias, dweight, dslope)):
        torch.testing.assert_close(got, want)  # the same reduction pass
    count = x.numel() // x.shape[1]
    elemt = ops.bn_act_bwd_elemt(grad, x, mean, invstd, weight, bias, slope, sums[0], sums[1], count)
    assert elemt.stride() == x.stride()
    torch.testing.assert_close(elemt.float(), dx.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_direct_path(layout, backend, monkeypatch):
    """backend= naming the implementation that the router does not pick runs it directly, with autograd."""
    other = "cuda" if backend == "triton" else "triton"
    monkeypatch.setenv(_backend.ENV_VAR, other)
    x = make_input((4, 8, 5, 5), layout).cuda()
    params = [p.float().cuda() for p in make_params(8, "prelu")]
    grad = torch.randn(x.shape, device="cuda")
    for training in (True, False):
        ours = run(x, params, grad, training, backend)
        exact = run(x.double(), [p.double() for p in params], grad.double(), training, "reference")
        for got, want in zip(ours, exact):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
