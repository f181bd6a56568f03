"""DDP on 2 CPU processes (gloo): ranks agree, and equal one process trained on the same global batches."""
import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from fastood import distributed as D
from fastood.trainers.standard import StandardTrainer

WORLD = 2
PER_RANK_BATCH = 8
EPOCHS = 2
DATA_SEED = 3


def _dataset(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3].argmax(1)).long()
    return TensorDataset(x, y)


def _model():
    # No BatchNorm: DDP broadcasts rank 0's buffers, while one process would see the whole global batch.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    info = D.init_from_env(backend="gloo", device="cpu", timeout_s=60)
    try:
        assert (info.rank, info.world_size) == (rank, WORLD) and D.is_distributed()
        D.seed_everything(0)
        model = _model()
        if rank == 1:  # DDP must broadcast rank 0's initial weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
        loader = D.distributed_loader(_dataset(), PER_RANK_BATCH, seed=DATA_SEED)
        trainer = StandardTrainer(model, lr=0.1, progress=False, checkpoint_dir=os.path.join(out_dir, "ckpt"),
                                  checkpoint_every=3, device=info.device)
        trainer.fit(loader, epochs=EPOCHS)
        seen = torch.cat([x for x, _ in loader])
        D.seed_everything(0, per_rank=True)
        draw = torch.rand(4)
        metrics = D.all_reduce_metrics({"rank": float(rank), "one": torch.tensor(1.0)})
        weighted = D.all_reduce_mean(torch.tensor([float(rank), 2.0]), weight=rank + 1)
        gathered = D.all_gather_tensor(torch.full((rank + 1, 2), float(rank)))
        fig = _fig_under_ddp(info.device)
        bn = {sync: _batchnorm_run(info.device, loader, sync) for sync in (False, True)}
        stopped = _sigterm_on_rank_1(info.device, loader, out_dir)
        rng = _resume_restores_each_ranks_rng(info.device, loader, out_dir)
        torch.save({"rng": rng, "params": [p.detach().clone() for p in model.parameters()],
                    "losses": [h["loss"] for h in trainer.history], "seen": seen, "draw": draw,
                    "metrics": metrics, "weighted": weighted, "gathered": gathered, "fig": fig, "bn": bn,
                    "stopped": stopped},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.cleanup()


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def _batchnorm_run(device, loader, sync_bn):
    """A BatchNorm model trained for one epoch under DDP, with per-rank or global-batch statistics."""
    model = _bn_model()
    trainer = StandardTrainer(model, lr=0.1, progress=False, device=device, sync_bn=sync_bn)
    trainer.fit(loader, epochs=1)
    restored = not any("forward" in vars(m) for m in model.modules())  # the layers are plain BatchNorm again
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "restored": restored}


def _sigterm_on_rank_1(device, loader, out_dir):
    """Only rank 1 is sent SIGTERM (at its step 2): both ranks must stop after the same step, with one checkpoint.
    Returns (the step the rank stopped at, the signal it reports)."""
    from fastood.trainers.interrupt import TrainingInterrupted

    class PreemptedRank(StandardTrainer):
        def training_step(self, batch):
            if self.step == 2 and D.rank() == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().training_step(batch)

    trainer = PreemptedRank(_model(), lr=0.1, progress=False, device=device,
                            checkpoint_dir=os.path.join(out_dir, "ckpt_sigterm"))
    try:
        trainer.fit(loader, steps=6)
    except TrainingInterrupted as exc:
        return exc.step, exc.signal
    return None


def _resume_restores_each_ranks_rng(device, loader, out_dir):
    """Train with per-rank seeds and checkpoints, scramble the RNG, resume: returns (this rank's state at the
    end of training, whether resuming restored exactly it)."""
    directory = os.path.join(out_dir, "ckpt_rng")
    first, second = _model(), _model()  # _model() seeds the global RNG: build both before the per-rank seeding
    D.seed_everything(5, per_rank=True)
    StandardTrainer(first, lr=0.1, progress=False, checkpoint_dir=directory, checkpoint_every=1,
                    device=device).fit(loader, steps=2)
    expected = torch.get_rng_state()
    torch.manual_seed(1234)
    resumed = StandardTrainer(second, lr=0.1, progress=False, checkpoint_dir=directory, device=device)
    assert resumed.resume()
    return expected, torch.equal(torch.get_rng_state(), expected)


class _Recording:
    """Wraps a sampler and keeps what it drew."""

    def __init__(self, inner):
        self.inner, self.drawn = inner, []

    @property
    def stats(self):
        return self.inner.stats

    def sample(self, model, n, shape, context=None):
        out = self.inner.sample(model, n, shape, context=context)
        self.drawn.append(out.clone())
        return out


def _fig_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _fig_under_ddp(device):
    """A few FIG steps of a tiny BatchNorm CNN under DDP, each rank with its own sampler seed."""
    from fastood.samplers.langevin import LangevinSampler
    from fastood.trainers.fig import FIGTrainer

    net = _fig_net()
    images = torch.rand(32, 1, 4, 4) * 2 - 1
    data = TensorDataset(images, torch.arange(32) % 3)
    sampler = _Recording(LangevinSampler(max_steps=3, early_stop=None))
    class Recording(FIGTrainer):
        wrapped = []

        def training_step(self, batch):
            self.wrapped.append(isinstance(self.net, nn.parallel.DistributedDataParallel))
            return super().training_step(batch)

    D.seed_everything(1, per_rank=True)
    trainer = Recording(net, sampler=sampler, k=0.5, lr=0.05, progress=False, device=device)
    trainer.fit(D.distributed_loader(data, 4, seed=0), steps=3)
    # DDP-wrapped while training; the wrapper is released when fit returns (it must not outlive the process group).
    return {"params": {k: v.detach().clone() for k, v in net.named_parameters()}, "drawn": torch.cat(sampler.drawn),
            "is_ddp": all(trainer.wrapped) and len(trainer.wrapped) == 3 and trainer._net is None}


def _run_two_ranks(out_dir, timeout_s=120):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-rank gloo run did not finish within {timeout_s} s")


def test_ddp_two_ranks_equal_single_process_on_same_global_batches(tmp_path):
    _run_two_ranks(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    # The ranks saw disjoint halves of the data and hold identical parameters.
    assert r0["seen"].shape[0] == r1["seen"].shape[0] == 32
    assert not any((r0["seen"][:, None] == r1["seen"][None]).all(-1).any(1))
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)

    # One process, global batches of WORLD * PER_RANK_BATCH in the same order (DistributedSampler with one
    # replica and the same seed yields the permutation the two ranks split), same init and optimizer.
    ds = _dataset()
    single_loader = DataLoader(ds, batch_size=WORLD * PER_RANK_BATCH,
                               sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=DATA_SEED))
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    single = StandardTrainer(model, lr=0.1, progress=False).fit(single_loader, epochs=EPOCHS)
    assert single.step == EPOCHS * 4
    moved = sum(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), before))
    assert moved > 1e-2
    for p, q in zip(model.parameters(), r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    # Logged losses are all-reduced: the mean of the ranks' mean losses = the global batch's mean loss.
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor([h["loss"] for h in single.history]),
                               rtol=1e-5, atol=1e-6)
    assert r0["losses"] == r1["losses"]

    # Rank 0 wrote the checkpoint, and it holds the final weights.
    state = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)
    assert state["step"] == EPOCHS * 4
    for key, q in zip(state["model"], r0["params"]):
        assert torch.equal(state["model"][key], q)

    # Per-rank seeds give different draws; the metric helpers combine ranks.
    assert not torch.equal(r0["draw"], r1["draw"])
    assert r0["metrics"] == r1["metrics"] == {"one": 1.0, "rank": 0.5}
    torch.testing.assert_close(r0["weighted"], torch.tensor([2 / 3, 2.0]))
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)

    # The checkpoint holds every rank's RNG state, and resuming gives each rank back its own.
    assert r0["rng"][1] and r1["rng"][1]
    assert not torch.equal(r0["rng"][0], r1["rng"][0])
    saved = torch.load(tmp_path / "ckpt_rng" / "checkpoint.pt", weights_only=False)
    assert len(saved["rng_per_rank"]) == WORLD
    assert torch.equal(saved["rng_per_rank"][1]["torch"], r1["rng"][0])

    # FIG under DDP: every rank draws its own Langevin samples, yet the ranks' parameters stay identical.
    f0, f1 = r0["fig"], r1["fig"]
    assert f0["is_ddp"] and f1["is_ddp"]
    assert f0["drawn"].shape == f1["drawn"].shape == (3 * 2, 1, 4, 4)  # 3 steps x ceil(0.5 * 4) samples
    assert not torch.allclose(f0["drawn"], f1["drawn"])
    for name, value in f0["params"].items():
        assert torch.equal(value, f1["params"][name]), name
    initial = dict(_fig_net().named_parameters())
    assert max(float((v - initial[k].detach()).abs().max()) for k, v in f0["params"].items()) > 1e-4

    # SIGTERM to one rank only: both stop after the same step (no rank left waiting), the checkpoint holds it.
    assert r0["stopped"] == (3, "a signal on another rank") and r1["stopped"] == (3, "SIGTERM")
    assert torch.load(tmp_path / "ckpt_sigterm" / "checkpoint.pt", weights_only=False)["step"] == 3

    # BatchNorm: with sync_bn the 2-rank run equals one process on the global batches (statistics over the
    # global batch); without it each rank normalizes with its own half, a different computation (the caveat).
    bn_single = _bn_model()
    StandardTrainer(bn_single, lr=0.1, progress=False).fit(single_loader, epochs=1)
    expected = bn_single.state_dict()
    synced, per_rank = r0["bn"][True], r0["bn"][False]
    assert synced["restored"] and r1["bn"][True]["restored"]
    for key, value in expected.items():
        torch.testing.assert_close(synced["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(r1["bn"][True]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    gap = max(float((per_rank["state"][k].float() - v.float()).abs().max()) for k, v in expected.items())
    assert gap > 1e-3, gap


def _stalled_worker(rank, port, out_dir, timeout_s):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    info = D.init_from_env(backend="gloo", device="cpu", timeout_s=timeout_s)
    if rank == 1:
        time.sleep(300)  # a stopped rank (the test kills it)
        return
    start = time.monotonic()
    try:
        StandardTrainer(_model(), lr=0.1, progress=False, device=info.device).fit(
            D.distributed_loader(_dataset(), PER_RANK_BATCH), steps=2)
        result = {"error": None}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.monotonic() - start
    torch.save(result, os.path.join(out_dir, "stalled.pt"))


def test_a_stopped_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    timeout_s = 2.0
    ctx = mp.start_processes(_stalled_worker, args=(_free_port(), str(tmp_path), timeout_s), nprocs=WORLD,
                             join=False, start_method="spawn")
    result_path = tmp_path / "stalled.pt"
    deadline = time.monotonic() + 120  # process start-up on a loaded machine; the run itself must fail in seconds
    try:
        while not result_path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            p.kill()
    assert result_path.exists(), "rank 0 stayed blocked on the stopped rank"
    result = torch.load(result_path)
    assert result["error"] is not None and "timed out" in result["error"].lower(), result
    # Failing took about the timeout, far from torch's default 30 minutes (generous bound for a loaded machine).
    assert result["seconds"] < 60, result


def test_init_from_env_checks_the_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        D.init_from_env(timeout_s=0)


def test_helpers_outside_a_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_from_env(device="cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True) and not D.is_distributed()
    assert D.rank_seed(7) == 7 and D.rank_seed(7, rank_=2) == 7 + 2 * 1_000_003
    assert D.all_reduce_metrics({"a": torch.tensor(2.5), "b": 1}) == {"a": 2.5, "b": 1.0}
    t = torch.arange(3.0)
    assert D.all_gather_tensor(t) is t and D.all_reduce_mean(4.0) == 4.0
    loader = D.distributed_loader(_dataset(10), 4, seed=1)
    assert isinstance(loader.sampler, DistributedSampler) and len(loader) == 3
    assert sorted(torch.cat([x for x, _ in loader]).sum(1).tolist()) == sorted(_dataset(10).tensors[0].sum(1).tolist())


def test_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        D.distributed_loader(_dataset(4), 0)
    with pytest.raises(ValueError, match="sampler"):
        D.distributed_loader(_dataset(4), 2, sampler=None)
    with pytest.raises(ValueError, match="empty"):
        D.distributed_loader(TensorDataset(torch.zeros(0, 2)), 2)
    with pytest.raises(ValueError, match="backend"):
        D.init_from_env(backend="tcp")
    with pytest.raises(ValueError, match="scalar"):
        D.all_reduce_metrics({"v": torch.zeros(2)})
    with pytest.raises(TypeError, match="tensor"):
        D.all_gather_tensor([1, 2])
