"""FusedSyncBNPReLU / FusedSyncBNReLU and convert_sync_batchnorm.

In one process (no process group): the modules are FusedBNPReLU / FusedBNReLU, their conversions to and from
nn.SyncBatchNorm, and convert_sync_batchnorm. With 2 processes on gloo (spawned once for the module, with a
deadline so that a hang fails instead of blocking): outputs, input gradients, parameter gradients (summed over
ranks) and running statistics over two steps equal nn.BatchNorm + activation on the concatenated batch in fp64,
with unequal batch sizes (one value per channel, an empty batch), NCHW and channels-last, PReLU and ReLU; and
three SGD steps of a converted model in DistributedDataParallel equal one process on the full batch."""
import copy
import datetime
import json
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fusedrect
from conftest import ACTIVATIONS, LAYOUTS, fused_module, make_input, make_params, torch_modules

WORLD = 2
DEADLINE_S = 120  # the whole 2-process run (a few seconds when it works)
COLLECTIVE_TIMEOUT_S = 30
TOLERANCE = {"atol": 1e-10, "rtol": 1e-9}

SYNCED = {"relu": fusedrect.FusedSyncBNReLU, "prelu": fusedrect.FusedSyncBNPReLU}


def synced_pair(channels, rank, activation, momentum=0.1):
    """(nn.BatchNorm + activation in fp64 with parameters away from the defaults, the synchronized fused copy)."""
    bn, act = torch_modules(channels, rank, activation, momentum=momentum, dtype=torch.float64)
    weight, bias, slope = make_params(channels, activation)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        if slope is not None:
            act.weight.copy_(slope)
    fused = SYNCED["relu" if activation == "relu" else "prelu"].from_modules(bn, act)
    return nn.Sequential(bn, act), fused


# ----------------------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_process_group_is_the_unsynchronized_module(layout, activation):
    _, synced = synced_pair(3, 4, activation)
    plain = fused_module(3, activation, dtype=torch.float64)
    plain.load_state_dict(synced.state_dict())
    for training in (True, True, False):
        x = make_input((4, 3, 5, 5), layout, torch.float64)
        grad = torch.randn(x.shape, dtype=torch.float64)
        results = []
        for model in (synced, plain):
            model.zero_grad()
            model.train(training)
            leaf = x.clone().requires_grad_()
            y = model(leaf)
            y.backward(grad)
            results.append((y, leaf.grad, *(p.grad for p in model.parameters())))
        assert all(torch.equal(a, b) for a, b in zip(*results))
    assert all(torch.equal(a, b) for a, b in zip(synced.state_dict().values(), plain.state_dict().values()))


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_conversions_to_and_from_sync_batchnorm(activation):
    group = object()  # any process group handle: the modules only carry it
    torch_pair, synced = synced_pair(4, 4, activation)
    bn = nn.SyncBatchNorm(4, momentum=0.2, process_group=group).double()
    bn.load_state_dict(torch_pair[0].state_dict())
    from_sync = type(synced).from_modules(bn, torch_pair[1])
    assert from_sync.process_group is group and from_sync.momentum == 0.2
    other = object()
    assert type(synced).from_modules(bn, torch_pair[1], process_group=other).process_group is other
    back = from_sync.to_modules()
    assert type(back[0]) is nn.SyncBatchNorm and back[0].process_group is group
    assert type(back[1]) is type(torch_pair[1])
    assert back.state_dict().keys() == torch_pair.state_dict().keys()
    for key, value in torch_pair.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value)
    assert type(from_sync.to_modules(nn.BatchNorm2d)[0]) is nn.BatchNorm2d
    assert synced.state_dict().keys() == fused_module(4, activation).state_dict().keys()


def test_memory_efficient_is_rejected():
    with pytest.raises(ValueError, match="memory_efficient: not supported by FusedSyncBNPReLU"):
        fusedrect.FusedSyncBNPReLU(3, memory_efficient=True)
    model = nn.Sequential(nn.Sequential(fusedrect.FusedBNPReLU(3, memory_efficient=True)))
    with pytest.raises(ValueError, match="model: 0.0 uses memory_efficient=True"):
        fusedrect.convert_sync_batchnorm(model)


@pytest.mark.parametrize("module", ["prelu", "relu", "preact"])
def test_parametrized_module_is_rejected(module):
    """Its synchronized copy would keep an unset (meta) weight: an error instead, naming the tensors."""
    layer = {"prelu": lambda: fusedrect.FusedBNPReLU(3), "relu": lambda: fusedrect.FusedBNReLU(3),
             "preact": lambda: fusedrect.FusedPreActConv2d(3, 4, 3)}[module]()
    name = "conv_weight" if module == "preact" else "weight"
    torch.nn.utils.parametrize.register_parametrization(layer, name, nn.Identity())
    model = nn.Sequential(nn.Conv2d(3, 3, 1), layer)
    with pytest.raises(ValueError, match=rf"model: 1 has parametrized tensors \({name}\)"):
        fusedrect.convert_sync_batchnorm(model)
    assert type(model[1]) is type(layer), "nothing converted before the error"


def test_process_group_must_be_a_process_group():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup or None, got str"):
        fusedrect.functional.sync_bn_relu(x, None, None, training=True, process_group="world")


def test_convert_sync_batchnorm_keeps_the_tensors():
    group = object()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), fusedrect.FusedBNPReLU(4, num_parameters=1, init=0.1, backend="cpp"),
        nn.Sequential(fusedrect.FusedBNReLU(4, affine=False, track_running_stats=False), nn.BatchNorm2d(4)),
    ).eval()
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    converted = fusedrect.convert_sync_batchnorm(model, group)
    assert converted is model
    prelu, (relu, bn) = model[1], model[2]
    assert type(prelu) is fusedrect.FusedSyncBNPReLU and type(relu) is fusedrect.FusedSyncBNReLU
    assert type(bn) is nn.SyncBatchNorm
    assert prelu.num_parameters == 1 and prelu.init == 0.1 and prelu.backend == "cpp"
    assert relu.weight is None and relu.running_mean is None
    assert all(m.process_group is group and not m.training for m in (prelu, relu, bn))
    assert all(t is tensors[name] for name, t in [*model.named_parameters(), *model.named_buffers()])
    assert len(tensors) == len(list(model.named_parameters())) + len(list(model.named_buffers()))
    root = fusedrect.FusedBNReLU(2)
    assert type(fusedrect.convert_sync_batchnorm(root)) is fusedrect.FusedSyncBNReLU
    assert type(fusedrect.revert_model(model)[1][0]) is nn.SyncBatchNorm


def test_convert_sync_batchnorm_rejects_what_it_cannot_synchronize():
    with pytest.raises(TypeError, match="model: expected an nn.Module, got int"):
        fusedrect.convert_sync_batchnorm(3)


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_convert_sync_batchnorm_splits_a_preact_conv_keeping_its_tensors(activation):
    unit = fusedrect.FusedPreActConv2d(3, 4, 3, 2, 1, bias=True, activation=activation).eval()
    tensors = {id(t) for t in [*unit.parameters(), *unit.buffers()]}
    x = torch.randn(2, 3, 6, 6)
    expected = unit(x)
    converted = fusedrect.convert_sync_batchnorm(nn.Sequential(unit))[0]
    sync_cls = fusedrect.FusedSyncBNPReLU if activation == "prelu" else fusedrect.FusedSyncBNReLU
    assert [type(m) for m in converted] == [sync_cls, nn.Conv2d] and not converted.training
    assert {id(t) for t in [*converted.parameters(), *converted.buffers()]} == tensors
    torch.testing.assert_close(converted(x), expected)


# ----------------------------------------------------------------------------------------------------------
# Two processes on gloo. Each rank runs every scenario; a scenario first runs every collective, then compares
# (so that a failed comparison on one rank cannot leave the other waiting in a collective).


def _split(full, sizes, rank):
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


def _module_scenario(rank, activation, layout, shape, sizes, momentum=0.1):
    """Two training steps and one eval step of the synchronized module on this rank's share of a batch, and of
    nn.BatchNorm + activation on the whole batch: (label, got, expected) triples."""
    torch.manual_seed(0)
    reference, synced = synced_pair(shape[1], len(shape), activation, momentum)
    full_shape = (sum(sizes), *shape[1:])
    pairs = []
    for step, training in enumerate((True, True, False)):
        x = make_input(full_shape, layout, torch.float64, scale=2.0, shift=float(step))
        grad = torch.randn(full_shape, dtype=torch.float64)
        for model in (reference, synced):
            model.zero_grad()
            model.train(training)
        leaf = x.clone().requires_grad_()
        expected = reference(leaf)
        expected.backward(grad)
        local = _split(x, sizes, rank).clone().requires_grad_()
        y = synced(local)
        y.backward(_split(grad, sizes, rank))
        param_grads = torch.cat([p.grad for p in synced.parameters()])
        dist.all_reduce(param_grads)  # each rank holds the gradients of its own share of the loss
        expected_param_grads = torch.cat([p.grad for p in reference.parameters()])
        pairs += [(f"step {step} output", y, _split(expected, sizes, rank)),
                  (f"step {step} input gradient", local.grad, _split(leaf.grad, sizes, rank)),
                  (f"step {step} parameter gradients", param_grads, expected_param_grads),
                  (f"step {step} running mean", synced.running_mean, reference[0].running_mean),
                  (f"step {step} running var", synced.running_var, reference[0].running_var),
                  (f"step {step} batches", synced.num_batches_tracked, reference[0].num_batches_tracked)]
    return pairs


def _ddp_scenario(rank, layouts=("nchw", "channels_last", "nchw"), sizes=(3, 2)):
    """Three SGD steps of a converted model in DistributedDataParallel (over a new process group) against the
    original model on the whole batch, which it matches when rank r's loss is WORLD * loss_r / batch (DDP averages
    the gradients over ranks)."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(4), nn.Conv2d(4, 4, 1),
                             nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(1), nn.Conv2d(4, 2, 1)).double()
    reference = copy.deepcopy(original)
    group = dist.new_group(list(range(WORLD)))
    fused = fusedrect.convert_sync_batchnorm(fusedrect.convert_model(original), group)
    kinds = [type(m) for m in fused]
    model = DistributedDataParallel(fused, process_group=group)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    batch = sum(sizes)
    # the first BN -> PReLU -> conv chain: a FusedPreActConv2d, split again by convert_sync_batchnorm
    pairs = [("converted modules", kinds, [nn.Conv2d, nn.Sequential, nn.Identity, nn.Identity,
                                           fusedrect.FusedSyncBNReLU, nn.Identity, nn.MaxPool2d, nn.Conv2d])]
    for step, layout in enumerate(layouts):
        x = make_input((batch, 3, 5, 6), layout, torch.float64)
        target = torch.randn(batch, 2, 5, 6, dtype=torch.float64)
        expected = reference(x)
        ((expected * target).sum() / batch).backward()
        y = model(_split(x, sizes, rank))
        ((y * _split(target, sizes, rank)).sum() * WORLD / batch).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        pairs.append((f"step {step} output", y, _split(expected, sizes, rank)))
    state = fused.state_dict()
    renamed = {"1.": "1.0.", "2.weight": "1.0.slope", "3.": "1.1."}  # the chain 1-3, split into (BN+PReLU, conv)
    for key, value in reference.state_dict().items():
        prefix = next((p for p in renamed if key.startswith(p)), "")
        pairs.append((f"state {key}", state[renamed.get(prefix, prefix) + key[len(prefix):]], value))
    return pairs


SCENARIOS = {
    **{f"{activation}-{layout}": (_module_scenario, dict(activation=activation, layout=layout, shape=(0, 3, 4, 5),
                                                         sizes=(3, 2)))
       for activation in ACTIVATIONS for layout in LAYOUTS},
    "one value per channel on rank 0": (_module_scenario, dict(activation="prelu", layout="nchw", shape=(0, 5),
                                                               sizes=(1, 3), momentum=None)),
    "empty batch on rank 1": (_module_scenario, dict(activation="relu", layout="channels_last", shape=(0, 3, 7),
                                                     sizes=(4, 0))),
    "DistributedDataParallel": (_ddp_scenario, {}),
}


def _compare(pairs):
    """None where every got equals its expected value, else the first difference."""
    for label, got, expected in pairs:
        try:
            if isinstance(got, torch.Tensor):
                torch.testing.assert_close(got, expected, **TOLERANCE)
            else:
                assert got == expected, f"{got} != {expected}"
        except AssertionError as error:
            return f"{label}: {error}"
    return None


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    for name, (scenario, kwargs) in SCENARIOS.items():
        try:
            results[name] = _compare(scenario(rank, **kwargs))
        except Exception:  # noqa: BLE001 - reported by the test of this scenario
            results[name] = traceback.format_exc()
    dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario's outcome on each of the 2 ranks: None, or what differed."""
    out_dir = tmp_path_factory.mktemp("sync_bn")
    context = mp.start_processes(_worker, args=(str(out_dir / "init"), str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD}-process gloo run did not finish within {DEADLINE_S} s")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_equal_one_process_on_the_whole_batch(two_ranks, scenario):
    for rank, results in enumerate(two_ranks):
        assert results[scenario] is None, f"rank {rank}: {results[scenario]}"
