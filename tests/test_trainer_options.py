"""Trainer options from the command line (``--set KEY=VALUE``): parsing, ``fastood train --set`` and the demo
builders, which let an option override even the builder's own choices."""
import argparse

import pytest

from fastood import cli, demo
from fastood.options import parse_trainer_option


def test_values_are_python_literals_or_strings():
    assert parse_trainer_option("freeze_bn=True") == ("freeze_bn", True)
    assert parse_trainer_option("lr=0.01") == ("lr", 0.01)
    assert parse_trainer_option("ratio=(2, 1, 1)") == ("ratio", (2, 1, 1))
    assert parse_trainer_option("pretrain_steps=None") == ("pretrain_steps", None)
    assert parse_trainer_option(" beta_range = authors ") == ("beta_range", "authors")
    assert parse_trainer_option("freeze_bn=auto") == ("freeze_bn", "auto")
    assert parse_trainer_option("schedule=") == ("schedule", "")


@pytest.mark.parametrize("text", ["freeze_bn", "=True", "two words=1", "1x=2"])
def test_malformed_options_name_what_was_given(text):
    with pytest.raises(ValueError, match="KEY=VALUE") as info:
        parse_trainer_option(text)
    assert repr(text) in str(info.value)


def test_train_parser_collects_set_options_and_rejects_malformed_ones(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["train", "manifold", "--set", "freeze_bn=True", "--set", "beta_range=authors"])
    assert dict(args.trainer_options) == {"freeze_bn": True, "beta_range": "authors"}
    config = demo.RunConfig.from_args(args, methods=[args.method], trainer_options=dict(args.trainer_options))
    assert config.trainer_options == {"freeze_bn": True, "beta_range": "authors"}
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "manifold", "--set", "freeze_bn"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_options_override_the_run_and_the_builders_defaults():
    config = demo.RunConfig(methods=["oe"], data="digits-0to4", tiny=True, lr=0.5,
                            trainer_options={"lr": 0.01, "margins": (-5.0, -1.0), "freeze_bn": True})
    ctx = argparse.Namespace(config=config, device="cpu", checkpoint_dir=lambda m: f"ck/{m}")
    kwargs = demo.Context.trainer_kwargs(ctx, "energy-oe", margins="auto", outliers="loader")
    assert kwargs["margins"] == (-5.0, -1.0) and kwargs["lr"] == 0.01 and kwargs["freeze_bn"] is True
    assert kwargs["outliers"] == "loader" and kwargs["checkpoint_dir"] == "ck/energy-oe"
    plain = demo.RunConfig(methods=["oe"], data="digits-0to4", tiny=True)
    ctx.config = plain
    assert demo.Context.trainer_kwargs(ctx, "energy-oe", margins="auto")["margins"] == "auto"
    assert "freeze_bn" not in demo.Context.trainer_kwargs(ctx, "oe")


def test_train_with_set_builds_the_trainer_with_the_option(tmp_path):
    config = demo.RunConfig(methods=["manifold"], data="digits-0to4", tiny=True, out=str(tmp_path / "run"),
                            cache=str(tmp_path / "cache"), quiet=True, device="cpu", plots=False,
                            trainer_options={"freeze_bn": True, "beta_range": "authors"})
    ctx = demo.Context(config)
    try:
        built = demo.METHODS["manifold"].build(ctx)
    finally:
        ctx.close()
    assert built.trainer.freeze_bn is True and built.trainer.sampler.beta_preset == "authors"
