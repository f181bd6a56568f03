import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fastood.trainers.outliers import (LoaderOutlierSource, OutlierSource, SamplerOutlierSource,
                                       as_outlier_source)


def _numbered(n=10, shape=(1, 2, 2)):
    """Images whose every pixel holds the image's index, so a batch tells which images it contains."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, *shape).clone()
    return x, torch.arange(n) % 3


def _ids(batch):
    return batch[:, 0, 0, 0].long().tolist()


def test_loader_of_tensors_cycles_with_its_own_batch_size():
    x, _ = _numbered(10)
    batches = [x[i:i + 4] for i in range(0, 10, 4)]  # a plain list is a re-iterable of tensors
    source = as_outlier_source(batches)
    assert isinstance(source, LoaderOutlierSource)
    got = [_ids(source.draw(99, None, (1, 2, 2))) for _ in range(5)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3], [4, 5, 6, 7]]  # n ignored, restarts at end
    assert source.batches_drawn == 5 and source.epoch == 1 and source.batch_in_epoch == 2


def test_loader_of_tuples_uses_the_first_item():
    x, y = _numbered(6)
    source = as_outlier_source(DataLoader(TensorDataset(x, y), batch_size=4))
    first = source.draw(4, None, (1, 2, 2))
    assert _ids(first) == [0, 1, 2, 3] and first.shape == (4, 1, 2, 2)


def test_exact_mode_returns_n_across_batch_boundaries():
    x, y = _numbered(7)
    source = as_outlier_source(DataLoader(TensorDataset(x, y), batch_size=3), exact=True)
    got = [_ids(source.draw(n, None, (1, 2, 2))) for n in (2, 5, 4, 0)]
    assert got == [[0, 1], [2, 3, 4, 5, 6], [0, 1, 2, 3], []]


def _shuffled_source(exact, seed=3):
    x, y = _numbered(10)
    return LoaderOutlierSource(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True), exact=exact, seed=seed)


@pytest.mark.parametrize("exact", [False, True])
def test_resume_continues_exactly_where_it_stopped(exact):
    reference = _shuffled_source(exact)
    stream = [_ids(reference.draw(3, None, None)) for _ in range(9)]  # crosses several passes

    interrupted = _shuffled_source(exact)
    for _ in range(4):
        interrupted.draw(3, None, None)
    state = interrupted.state_dict()
    assert state["batches_drawn"] == interrupted.batches_drawn > 0

    torch.manual_seed(1234)  # the global RNG at resume time must not matter
    resumed = _shuffled_source(exact)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert [_ids(resumed.draw(3, None, None)) for _ in range(5)] == stream[4:]


def test_pass_order_depends_on_seed_and_pass_not_on_global_rng():
    a, b, c = _shuffled_source(False), _shuffled_source(False), _shuffled_source(False, seed=4)
    torch.manual_seed(0)
    first_a = [_ids(a.draw(None, None, None)) for _ in range(6)]
    torch.manual_seed(99)
    first_b = [_ids(b.draw(None, None, None)) for _ in range(6)]
    first_c = [_ids(c.draw(None, None, None)) for _ in range(6)]
    assert first_a == first_b and first_a != first_c
    assert first_a[:3] != first_a[3:6]  # a new pass is a new order
    state = torch.get_rng_state()
    a.draw(None, None, None)
    assert torch.equal(state, torch.get_rng_state())  # drawing leaves the global RNG alone


def test_distributed_sampler_gets_set_epoch():
    x, y = _numbered(8)
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    epochs = []
    original = sampler.set_epoch
    sampler.set_epoch = lambda e: (epochs.append(e), original(e))
    source = as_outlier_source(DataLoader(ds, batch_size=4, sampler=sampler))
    for _ in range(5):
        source.draw(None, None, None)
    assert epochs == [0, 1, 2]


def test_loader_errors():
    with pytest.raises(ValueError, match="no batches"):
        as_outlier_source([]).draw(4, None, None)
    with pytest.raises(ValueError, match="only empty batches"):  # exact mode would wait forever for rows
        as_outlier_source([torch.zeros(0, 1, 2, 2)], exact=True).draw(2, None, None)
    empty = as_outlier_source([torch.zeros(0, 1, 2, 2)])
    assert empty.draw(2, None, None).shape[0] == 0  # one empty batch passes through (a zero loss term) ...
    with pytest.raises(ValueError, match="only empty batches"):  # ... but a whole pass of them is an error
        empty.draw(2, None, None)
    with pytest.raises(ValueError, match="shape"):
        as_outlier_source([torch.zeros(2, 1, 2, 2)]).draw(2, None, (3, 2, 2))
    with pytest.raises(TypeError, match="image tensors"):
        as_outlier_source([["not", "images"]]).draw(2, None, None)
    with pytest.raises(TypeError, match="TensorDataset"):
        as_outlier_source(torch.zeros(4, 1, 2, 2))
    with pytest.raises(TypeError, match="DataLoader"):
        as_outlier_source(42)
    with pytest.raises(ValueError, match="n must be an int"):
        as_outlier_source([torch.zeros(2, 1, 2, 2)], exact=True).draw(-1, None, None)


class FakeSampler:
    """Implements the sampler protocol: remembers its calls, returns images full of the call number."""

    def __init__(self):
        self.calls = []
        self.stats = {}
        self.restored = None

    def sample(self, model, n, shape, context=None):
        self.calls.append((model, n, tuple(shape), context))
        x = torch.full((n,) + tuple(shape), float(len(self.calls)), requires_grad=True)
        self.stats = {"n": n}
        return x * 1.0

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        self.restored = state


def test_sampler_source_passes_model_n_shape_context():
    sampler = FakeSampler()
    source = as_outlier_source(sampler)
    assert isinstance(source, SamplerOutlierSource)
    model = nn.Linear(2, 2)
    context = (torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long))
    x = source.draw(5, model, (1, 2, 2), context=context)
    assert x.shape == (5, 1, 2, 2) and not x.requires_grad
    assert sampler.calls[0][0] is model and sampler.calls[0][1:3] == (5, (1, 2, 2))
    assert sampler.calls[0][3] is context
    assert source.stats == {"n": 5} and source.batches_drawn == 1
    state = source.state_dict()
    assert state == {"batches_drawn": 1, "sampler": {"calls": 1}}
    other = SamplerOutlierSource(FakeSampler())
    other.load_state_dict(state)
    assert other.batches_drawn == 1 and other.sampler.restored == {"calls": 1}


def test_sampler_without_context_argument_and_with_a_buffer():
    class Minimal:  # the DESIGN's sample(model, n, shape), no context parameter; a replay buffer attribute
        buffer = torch.ones(2, 1)

        def sample(self, model, n, shape):
            return torch.zeros((n,) + tuple(shape))

    source = as_outlier_source(Minimal())
    assert source.draw(3, None, (1, 2, 2)).shape == (3, 1, 2, 2)
    state = source.state_dict()
    assert torch.equal(state["buffer"], torch.ones(2, 1))
    fresh = SamplerOutlierSource(Minimal())
    fresh.sampler.buffer = None
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sampler.buffer, torch.ones(2, 1))


def test_sampler_returning_the_wrong_size_is_an_error():
    class Bad:
        def sample(self, model, n, shape, context=None):
            return torch.zeros((n + 1,) + tuple(shape))

    with pytest.raises(ValueError, match="expected \\[4"):
        as_outlier_source(Bad()).draw(4, None, (1, 2, 2))


def test_real_noise_sampler_and_passthrough():
    from fastood.samplers.noise import GaussianNoiseSampler

    source = as_outlier_source(GaussianNoiseSampler(std=0.5))
    x = source.draw(6, nn.Linear(2, 2), (1, 4, 4))
    assert x.shape == (6, 1, 4, 4) and x.min() >= -1 and x.max() <= 1
    assert as_outlier_source(source) is source
    assert isinstance(source, OutlierSource)


class _Augmented(torch.utils.data.Dataset):
    """Numbered images plus global-RNG noise drawn in __getitem__ (as main-process augmentation does)."""

    def __init__(self, n=10):
        self.x, _ = _numbered(n)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.rand(1)


def test_resume_leaves_the_global_rng_where_a_straight_run_has_it():
    def source():
        return LoaderOutlierSource(DataLoader(_Augmented(), batch_size=3, shuffle=True), seed=3)

    torch.manual_seed(0)
    straight = source()
    for _ in range(2):
        straight.draw(3, None, None)
    state, rng = straight.state_dict(), torch.get_rng_state()
    expected = [straight.draw(3, None, None) for _ in range(3)] + [torch.rand(2)]

    resumed = source()
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)  # what Trainer.resume restores with the checkpoint
    got = [resumed.draw(3, None, None) for _ in range(3)] + [torch.rand(2)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_resume_at_the_exact_end_of_a_pass_starts_the_next_one():
    # A checkpoint written right after a pass's last batch (here: 3 batches of a 3-batch loader) used to fail on
    # resume with "cannot resume the outlier loader at batch 3 of pass 0: it is shorter now".
    reference = _shuffled_source(False)
    stream = [_ids(reference.draw(None, None, None)) for _ in range(6)]
    interrupted = _shuffled_source(False)
    for _ in range(3):
        interrupted.draw(None, None, None)
    resumed = _shuffled_source(False)
    resumed.load_state_dict(interrupted.state_dict())
    assert [_ids(resumed.draw(None, None, None)) for _ in range(3)] == stream[3:]
    assert resumed.epoch == 1 and resumed.batch_in_epoch == 3
