"""The CPU ops' cache of recycled output buffers (fusedrect.buffer_cache): outputs of 128 KiB or more reuse the
memory of freed ones of the same size class, within a limit of idle bytes; the results never depend on it."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import fusedrect
from conftest import make_input

MIB = 1 << 20
SHAPE = (8, 64, 32, 32)  # 2 MiB in fp32: served by the cache
SMALL = (2, 8, 8, 8)     # 4 KiB: left to PyTorch's allocator


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts with no idle buffer and a 64 MiB limit; the limit in force before is restored."""
    limit = fusedrect.buffer_cache_info()["limit_bytes"]
    fusedrect.set_buffer_cache_limit(64 * MIB)
    fusedrect.empty_buffer_cache()
    yield
    fusedrect.empty_buffer_cache()
    fusedrect.set_buffer_cache_limit(limit)


def stats():
    return fusedrect.buffer_cache_info()


def eval_op(x, channels=SHAPE[1]):
    mean, invstd = torch.zeros(channels), torch.ones(channels)
    return torch.ops.fusedrect.bn_act_fwd_eval(x, mean, invstd, None, None, torch.full((channels,), 0.25))


def fresh_result(fn):
    """fn() computed with the cache off: the output in new memory."""
    limit = stats()["limit_bytes"]
    fusedrect.set_buffer_cache_limit(0)
    try:
        return fn()
    finally:
        fusedrect.set_buffer_cache_limit(limit)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_freed_output_is_reused_and_fully_rewritten(layout):
    first = eval_op(make_input(SHAPE, layout))
    address = first.data_ptr()
    del first
    assert stats()["idle_buffers"] == 1 and stats()["idle_bytes"] == 2 * MIB
    hits = stats()["hits"]
    x = make_input(SHAPE, layout, shift=3.0)
    second = eval_op(x)
    assert second.data_ptr() == address and stats()["hits"] == hits + 1 and stats()["idle_buffers"] == 0
    assert second.stride() == x.stride()
    torch.testing.assert_close(second, fresh_result(lambda: eval_op(x)), rtol=0, atol=0)


def test_the_training_step_reuses_the_last_steps_outputs():
    layer = fusedrect.FusedBNPReLU(SHAPE[1])
    x = torch.randn(SHAPE, requires_grad=True)
    grad_out = torch.randn(SHAPE)

    def step():
        x.grad = None
        layer(x).backward(grad_out)
        return x.grad.clone()

    step()
    before = stats()
    grads = [step() for _ in range(3)]
    after = stats()
    # y and dx of every step (the clones of dx, from PyTorch's allocator, are not counted).
    assert after["hits"] - before["hits"] == 6 and after["misses"] == before["misses"]
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], fresh_result(step), rtol=0, atol=0)


def test_a_zero_limit_keeps_nothing():
    fusedrect.set_buffer_cache_limit(0)
    misses = stats()["misses"]
    del_twice = [eval_op(torch.randn(SHAPE)) for _ in range(2)]
    del del_twice
    assert stats()["idle_buffers"] == 0 and stats()["misses"] == misses + 2


def test_the_oldest_idle_buffers_go_first_past_the_limit():
    fusedrect.set_buffer_cache_limit(4 * MIB)
    first, second, third = (eval_op(torch.randn(SHAPE)) for _ in range(3))
    newest = third.data_ptr()
    del first, second, third  # in this order: the first is evicted when the third arrives
    assert stats()["idle_buffers"] == 2 and stats()["idle_bytes"] == 4 * MIB
    big = eval_op(torch.randn(8, 64, 64, 64), 64)  # 8 MiB: more than the limit, freed at once, the others kept
    del big
    assert stats()["idle_buffers"] == 2
    assert eval_op(torch.randn(SHAPE)).data_ptr() == newest  # the most recently freed is taken first
    fusedrect.set_buffer_cache_limit(0)  # a lower limit evicts at once
    assert stats()["idle_buffers"] == 0


def test_empty_frees_every_idle_buffer_and_keeps_the_limit():
    outputs = [eval_op(torch.randn(SHAPE)) for _ in range(2)]
    del outputs
    assert stats()["idle_buffers"] == 2
    fusedrect.empty_buffer_cache()
    assert stats()["idle_buffers"] == 0 and stats()["idle_bytes"] == 0 and stats()["limit_bytes"] == 64 * MIB


def test_small_outputs_bypass_the_cache():
    before = stats()
    y = eval_op(torch.randn(SMALL), SMALL[1])
    del y
    after = stats()
    assert (after["hits"], after["misses"], after["idle_buffers"]) == (before["hits"], before["misses"], 0)


def test_a_recycled_output_resizes_like_any_tensor():
    y = eval_op(torch.randn(SHAPE))
    y.resize_(2, *SHAPE)  # its storage grows through the cache's allocator
    y.fill_(1.5)
    assert y.sum().item() == 1.5 * 2 * torch.Size(SHAPE).numel()
    del y  # both the 2 MiB buffer it left and the 4 MiB one it died with are idle
    assert stats()["idle_bytes"] == 6 * MIB and stats()["idle_buffers"] == 2


@pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="needs torch._lazy_clone")
def test_a_recycled_output_can_be_cloned_lazily():
    """Copy-on-write (torch._lazy_clone) wraps the cache's context like the default allocator's."""
    y = eval_op(torch.randn(SHAPE))
    expected = y.clone()
    lazy = torch._lazy_clone(y)
    y.add_(1)  # the write copies: the clone keeps the old values
    torch.testing.assert_close(lazy, expected, rtol=0, atol=0)
    del y, lazy
    assert stats()["idle_buffers"] >= 1


def test_an_output_freed_on_another_thread_returns_to_the_cache():
    outputs = [eval_op(torch.randn(SHAPE))]
    thread = threading.Thread(target=outputs.clear)
    thread.start()
    thread.join()
    assert stats()["idle_buffers"] == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_takes_and_returns_buffers():
    outputs = [eval_op(torch.randn(SHAPE))]
    outputs.clear()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it, with 0 where its buffer came from the inherited cache
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP threads are not in the child
            hits = stats()["hits"]
            y = eval_op(torch.randn(SHAPE))
            del y
            code = 0 if stats()["hits"] == hits + 1 and stats()["idle_buffers"] == 1 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("value, error", [(-1, ValueError), (2**63, ValueError), (1.5, TypeError), (True, TypeError)])
def test_a_bad_limit_is_rejected(value, error):
    with pytest.raises(error, match="nbytes"):
        fusedrect.set_buffer_cache_limit(value)


@pytest.mark.parametrize("value, limit",
                         [("0", 0), ("3", 3 * MIB), ("lots", None), ("-2", None), (str(2**43), None)])
def test_the_limit_comes_from_the_environment(value, limit):
    script = "import fusedrect; print(fusedrect.buffer_cache_info()['limit_bytes'])"
    env = {**os.environ, "FUSEDRECT_BUFFER_CACHE_MB": value}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if limit is None:
        assert run.returncode != 0 and "FUSEDRECT_BUFFER_CACHE_MB: expected a whole number of MiB" in run.stderr
    else:
        assert run.returncode == 0, run.stderr
        assert int(run.stdout) == limit
