"""detection.distributed.average_norm_statistics in two gloo processes, against the mean computed by hand."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from detection.distributed import average_norm_statistics


def model(rank: int) -> nn.Module:
    """Two BN layers (2-d and 1-d) whose statistics differ by process, and a conv between them."""
    torch.manual_seed(rank)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm1d(5))
    for bn in (net[0], net[2]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    return net


def worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        frozen = model(rank).eval()
        results[f"frozen {rank}"] = (average_norm_statistics(frozen), frozen.state_dict())
        training = model(rank).train()
        results[f"training {rank}"] = (average_norm_statistics(training), training.state_dict())
    finally:
        dist.destroy_process_group()


def test_two_processes_end_with_the_mean_statistics_and_frozen_bn_is_left_alone():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, results), nprocs=2, join=True)
    mine = [model(rank).state_dict() for rank in (0, 1)]
    for rank in (0, 1):
        done, state = results[f"frozen {rank}"]
        assert not done and all(torch.equal(state[k], mine[rank][k]) for k in state)  # eval mode: untouched
        done, state = results[f"training {rank}"]
        assert done == 4  # running_mean and running_var of both layers
        for key, value in state.items():
            if key.endswith(("running_mean", "running_var")):
                assert torch.allclose(value, (mine[0][key] + mine[1][key]) / 2, atol=1e-6), key
            else:  # weights, biases and num_batches_tracked: this process's own
                assert torch.equal(value, mine[rank][key]), key


def test_one_process_is_a_no_op():
    net = model(0).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert average_norm_statistics(net) == 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
