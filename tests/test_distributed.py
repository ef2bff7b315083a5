"""Two gloo processes at batch N agree with one process at batch 2N, for every loss that gathers.

DDP is simulated: a shared linear layer (same seed everywhere) maps each
process's slice of a fixed global batch of features to projections; after
backward, the gradients of that layer and of the method's own parameters are
all-reduced and averaged over processes, which is what DDP does. Losses are
compared as the mean over processes (a loss over local anchors averages to the
global one). One fork of two processes runs every case, to keep the test fast.
"""
import os

import pytest
from conftest import free_port
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from wrapssl import distributed
from wrapssl.methods import DINO, NNCLR, BarlowTwins, MoCo, SimCLR, SwAV, VICReg

N, FEATURES, P = 4, 6, 8  # per-process batch, input width, projection width


def cases() -> dict:
    """name -> (method factory, views, global views fed to a target or 0, steps)."""
    return {
        "simclr": (lambda: SimCLR(temperature=0.3), 2, 0, 1),
        "simclr_3_views": (lambda: SimCLR(temperature=0.5), 3, 0, 1),
        "moco": (lambda: MoCo(temperature=0.5, projection_size=P, projection_hidden_size=16,
                              prediction_hidden_size=16), 2, 2, 1),
        "barlow_twins": (lambda: BarlowTwins(lambd=0.05, projector_dims=(P,)), 2, 0, 1),
        "vicreg": (lambda: VICReg(projector_dims=(P,)), 2, 0, 1),
        "dino": (lambda: DINO(out_dim=P, hidden_size=16, bottleneck_size=4, warmup_teacher_temp_steps=4), 4, 2, 2),
        "nnclr": (lambda: NNCLR(temperature=0.2, queue_size=4 * N, projection_size=P, projection_hidden_size=16,
                                prediction_hidden_size=16), 2, 0, 4),
        "swav": (lambda: SwAV(n_prototypes=5, projection_size=P, freeze_prototypes_steps=0), 4, 0, 1),
        "swav_queue": (lambda: SwAV(n_prototypes=5, projection_size=P, freeze_prototypes_steps=0,
                                    queue_length=3 * N), 3, 0, 3),
    }


def ddp_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean over processes, as DDP averages gradients (``x`` itself in one process)."""
    return distributed.all_reduce_sum(x) / distributed.world_size()


def run_cases(rank: int, world: int) -> dict:
    """Loss, DDP-averaged gradients and method state per case and step, on this process's slice."""
    out = {}
    for name, (make, n_views, n_target, steps) in cases().items():
        torch.manual_seed(0)
        method = make()
        method.build(FEATURES)
        if hasattr(method, "predictor"):
            method.predictor.eval()  # per-process BN statistics would differ from the global batch's
        online_layer, target_layer = nn.Linear(FEATURES, P), nn.Linear(FEATURES, P)
        params = dict(online_layer.named_parameters(prefix="online"))
        params.update(method.named_parameters(prefix="method"))
        records = []
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + 1)
            batch = [torch.randn(2 * N, FEATURES, generator=g) for _ in range(n_views)]  # the global batch
            mine = [x[rank * N:(rank + 1) * N] for x in batch] if world > 1 else batch
            online = [online_layer(x) for x in mine]
            with torch.no_grad():
                target = [target_layer(x) for x in mine[:n_target]] if n_target else None
            for p in params.values():
                p.grad = None
            loss = method(online, target, step=step)
            loss.backward()
            grads = {k: ddp_mean(p.grad) for k, p in params.items() if p.grad is not None}
            state = {k: v.clone() for k, v in method.state_dict().items() if k.split(".")[0] in ("center", "queue",
                                                                                                   "queue_len")}
            records.append(dict(loss=ddp_mean(loss.detach()), grads=grads, state=state))
        out[name] = records
    return out


def check_gather(rank: int, world: int) -> dict:
    """gather's forward, its summed-gradient backward and the reductions, seen from one process."""
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = distributed.gather(x)
    weights = torch.arange(y.numel(), dtype=torch.float32).view_as(y)
    (y * weights).sum().backward()
    return dict(gathered=y.detach(), grad=x.grad, rank=distributed.rank(), world=distributed.world_size(),
                total=distributed.all_reduce_sum(torch.tensor([rank + 1.0])))


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # cases are seeded to use the same global batch; each process takes its slice
        torch.save(dict(gather=check_gather(rank, world), cases=run_cases(rank, world)),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    # forked, not spawned: the children start with torch and wrapssl already imported (seconds saved per process);
    # they run one intra-op thread, so no OpenMP pool is shared across the fork
    mp.start_processes(worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_gather_concatenates_and_sums_gradients(two_processes):
    for rank, res in enumerate(two_processes):
        g = res["gather"]
        assert g["rank"] == rank and g["world"] == 2
        torch.testing.assert_close(g["gathered"], torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)]))
        # both processes used the same weights: this slice's gradient is twice its weights
        weights = torch.arange(12, dtype=torch.float32).view(4, 3)
        torch.testing.assert_close(g["grad"], 2 * weights[2 * rank:2 * rank + 2])
        assert g["total"].item() == 3.0


def test_helpers_are_no_ops_without_a_process_group():
    assert distributed.world_size() == 1 and distributed.rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather(x) is x
    total = distributed.all_reduce_sum(x)
    assert torch.equal(total, x) and not total.requires_grad


@pytest.fixture(scope="module")
def one_process():
    return run_cases(0, 1)


@pytest.mark.parametrize("name", sorted(cases()))
def test_two_processes_match_one_process_at_twice_the_batch(two_processes, one_process, name):
    single = one_process[name]
    for rank, res in enumerate(two_processes):
        for step, (one, two) in enumerate(zip(single, res["cases"][name])):
            where = f"{name} rank {rank} step {step}"
            torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6, msg=where)
            assert one["grads"].keys() == two["grads"].keys(), where
            assert any(g.abs().sum() > 0 for g in one["grads"].values()), where
            for k in one["grads"]:
                torch.testing.assert_close(two["grads"][k], one["grads"][k], rtol=1e-4, atol=1e-6,
                                           msg=f"{where}: gradient of {k}")
            assert one["state"].keys() == two["state"].keys(), where
            for k in one["state"]:
                torch.testing.assert_close(two["state"][k], one["state"][k], rtol=1e-5, atol=1e-6,
                                           msg=f"{where}: {k}")
