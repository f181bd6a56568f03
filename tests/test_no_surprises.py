"""No silent surprises (issue 21, section 4): each finding of the trial as a test that failed before the fix.

- re-running a script with the same checkpoint_dir and progress=False resumed silently;
- data in [0, 1] under the default (-1, 1) box gave no warning; the range warning pointed at ``sys:1`` and was a
  plain UserWarning;
- ICE replaced the model without a word (``MSP(model)`` on the user's variable scored the old head);
- after ``fit`` the model was left in train() mode with BatchNorm in eval mode;
- the freeze_bn docstrings disagreed with the defaults.
"""
import inspect
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastood
from fastood import trainers as T
from fastood.samplers import GaussianNoiseSampler, LangevinSampler


def cnn(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, classes))


def loader(n=12, classes=3, low=-1.0, high=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, torch.arange(n) % classes), batch_size=6)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_warns_whatever_progress_is(tmp_path):
    T.StandardTrainer(cnn(), checkpoint_dir=tmp_path, progress=False).fit(loader(), steps=2)
    again = T.StandardTrainer(cnn(), checkpoint_dir=tmp_path, progress=False)
    with pytest.warns(fastood.ResumeWarning, match=r"resumed from .*checkpoint\.pt at step 2 of 2.*trains nothing") \
            as caught:
        again.fit(loader(), steps=2)
    assert caught[0].filename == __file__                       # the user's fit line, not fastood's
    assert again.resumed is not None and again.resumed.step == 2
    longer = T.StandardTrainer(cnn(), checkpoint_dir=tmp_path, progress=False)
    with pytest.warns(fastood.ResumeWarning, match="at step 2 of 4") as caught:
        longer.fit(loader(), steps=4)
    assert "trains nothing" not in str(caught[0].message) and longer.step == 4
    with warnings.catch_warnings():                             # resume=False: no resume, no warning
        warnings.simplefilter("error", fastood.ResumeWarning)
        T.StandardTrainer(cnn(), checkpoint_dir=tmp_path, progress=False).fit(loader(), steps=1, resume=False)


# ------------------------------------------------------------------------------------------------ data range
def test_pixels_in_0_1_under_the_default_box_warn_and_name_bounds_for():
    trainer = T.GaussianNoiseTrainer(cnn(), sampler=GaussianNoiseSampler(), progress=False)
    with pytest.warns(fastood.DataRangeWarning, match=r"at most half of the box.*bounds=\(0\.0, 1\.0\).*bounds_for") \
            as caught:
        trainer.fit(loader(low=0.0, high=1.0), steps=1)
    assert len([w for w in caught if w.category is fastood.DataRangeWarning]) == 1
    assert caught[0].filename == __file__                       # not sys:1
    with warnings.catch_warnings():                             # the right box: quiet
        warnings.simplefilter("error", fastood.DataRangeWarning)
        T.GaussianNoiseTrainer(cnn(), bounds=(0.0, 1.0), progress=False).fit(loader(low=0.0, high=1.0), steps=1)
        T.GaussianNoiseTrainer(cnn(), progress=False).fit(loader(), steps=1)


def test_data_outside_the_box_warn_with_their_own_class_at_the_users_line():
    trainer = T.FIGTrainer(cnn(), sampler=LangevinSampler(max_steps=1), progress=False)
    with pytest.warns(fastood.DataRangeWarning, match=r"bounds=fastood.data.bounds_for\(mean, std\)") as caught:
        trainer.fit(loader(low=-2.5, high=2.5), steps=1)
    assert issubclass(caught[0].category, UserWarning) and caught[0].filename == __file__


# ------------------------------------------------------------------------------------------------ replaced model
def test_ice_says_once_that_it_replaced_the_model():
    outliers = DataLoader(TensorDataset(torch.rand(6, 1, 8, 8) * 2 - 1), batch_size=6)
    model = cnn()
    with pytest.warns(fastood.ModelReplacedWarning, match=r"trainer\.model is a new GaussianClassifier") as caught:
        trainer = T.ICETrainer(model, outliers=outliers, progress=False)
    assert len([w for w in caught if w.category is fastood.ModelReplacedWarning]) == 1
    assert caught[0].filename == __file__ and trainer.model is not model
    with warnings.catch_warnings():                             # training it, or a model that has the head: no more
        warnings.simplefilter("error", fastood.ModelReplacedWarning)
        trainer.fit(loader(), steps=1)
        T.ICETrainer(trainer.model, outliers=outliers, progress=False)


# ------------------------------------------------------------------------------------------------ modes after fit
@pytest.mark.parametrize("make", [
    lambda m: T.FIGTrainer(m, sampler=LangevinSampler(max_steps=1), progress=False),      # freeze_bn=True
    lambda m: T.OETrainer(m, outliers=DataLoader(TensorDataset(torch.rand(6, 1, 8, 8)), batch_size=6),
                          progress=False),
    lambda m: T.StandardTrainer(m, freeze_bn=True, progress=False),
])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_fit_leaves_the_models_modes_as_it_found_them(make, mode):
    model = cnn()
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model[1].eval()                                         # the user froze this BatchNorm on purpose
    before = [m.training for m in model.modules()]
    trainer = make(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(loader(), steps=2)
    assert [m.training for m in model.modules()] == before


def test_modes_are_restored_when_fit_raises():
    model = cnn().eval()
    trainer = T.StandardTrainer(model, progress=False)
    bad = DataLoader(TensorDataset(torch.full((6, 1, 8, 8), float("nan")), torch.zeros(6, dtype=torch.long)),
                     batch_size=6)
    with pytest.raises(FloatingPointError):
        trainer.fit(bad, steps=1)
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------------------------------------ docstrings
_LITERAL = r"(?:``)?(True|False|None)\b(?:``)?"
_TRAINERS = [T.Trainer, T.StandardTrainer, T.FIGTrainer, T.GaussianNoiseTrainer, T.CVAETrainer, T.ManifoldTrainer,
             T.CMGTrainer, T.DiscrepancyTrainer, T.ICETrainer, T.OETrainer, T.EnergyOETrainer, T.OutlierTrainer]


def freeze_bn_default(cls):
    """The ``freeze_bn`` default a user gets: from the nearest ``__init__`` in the MRO that names the argument."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and "freeze_bn" in inspect.signature(init).parameters:
            return inspect.signature(init).parameters["freeze_bn"].default
    raise AssertionError(f"{cls.__name__} takes no freeze_bn")


def freeze_bn_text(cls):
    """The passages of the nearest docstring in the MRO that documents ``freeze_bn`` (each from the mention to the
    end of its argument entry, bullet or paragraph)."""
    for klass in cls.__mro__:
        doc = klass.__dict__.get("__doc__") or ""
        if "freeze_bn" in doc:
            parts = []
            for match in re.finditer(r"freeze_bn", doc):
                start = max(0, match.start() - 16)  # with what leads in: "by default (``freeze_bn=False``)"
                rest = doc[match.start():]
                end = re.search(r"\n\s*\n|\n\s{8}\w[\w, ]*: |\n\s*- ", rest)
                stop = match.start() + (end.start() if end else len(rest))
                parts.append(" ".join(doc[start:stop].split()))
            return klass, parts
    raise AssertionError(f"no docstring in {cls.__name__}'s MRO documents freeze_bn")


def own_claim(parts):
    patterns = [r"``freeze_bn=(True|False|None)``\s*\((?:the )?default", r"by default \(``freeze_bn=(\w+)``\)",
                r"[Dd]efault\)?:?\s*" + _LITERAL, _LITERAL + r"\s*\(default\)"]
    for pattern in patterns:
        for text in parts:
            found = re.search(pattern, text)
            if found:
                return found.group(1)
    return None


def trainer_claims(parts):
    """``{trainer name: claimed default}`` for every trainer a passage names with a True/False/None in the same
    clause (up to ';', '.' or ')')."""
    claims = {}
    for text in parts:
        for clause in re.split(r"[;.)]", text):
            for name in re.findall(r"\b(\w+Trainer)\b", clause):
                after = clause[clause.index(name) + len(name):]
                value = re.search(_LITERAL, after)
                if value and "freeze_bn=" not in after[: value.start()]:
                    claims.setdefault(name, value.group(1))
    return claims


@pytest.mark.parametrize("cls", _TRAINERS, ids=lambda c: c.__name__)
def test_freeze_bn_docstrings_match_the_defaults(cls):
    actual = repr(freeze_bn_default(cls))
    documenting, parts = freeze_bn_text(cls)
    claimed = own_claim(parts)
    assert claimed == actual, (f"{cls.__name__}.freeze_bn defaults to {actual}, but {documenting.__name__}'s "
                               f"docstring says {claimed}: {parts}")
    for name, value in trainer_claims(parts).items():
        other = getattr(T, name)
        assert value == repr(freeze_bn_default(other)), (
            f"{documenting.__name__}'s docstring says {name} defaults to freeze_bn={value}, it is "
            f"{freeze_bn_default(other)!r}")


def test_the_base_docstring_names_every_trainer_whose_default_differs():
    base = repr(freeze_bn_default(T.Trainer))
    _, parts = freeze_bn_text(T.Trainer)
    claims = trainer_claims(parts)
    differ = {cls.__name__ for cls in _TRAINERS if repr(freeze_bn_default(cls)) != base}
    assert differ == {"FIGTrainer", "GaussianNoiseTrainer", "ICETrainer"}
    assert {"FIGTrainer", "ICETrainer"} <= set(claims), claims  # GS is FIG's loop: documented with FIG
