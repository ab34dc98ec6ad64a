import pytest

import depthlab as dl


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"norm_placement": "middle"}, "norm_placement"),
        ({"norm_kind": "group"}, "norm_kind"),
        ({"activation": "swish"}, "activation"),
        ({"init": "orthogonal"}, "init"),
        ({"n_layers": 0}, "n_layers"),
        ({"d_model": 60, "n_heads": 8}, "d_model"),
        ({"beta_ff": -1.0}, "beta_ff"),
        ({"dropout": 1.5}, "dropout"),
        ({"residual": "yes"}, "residual"),
        ({"norm_placement": "none"}, "norm_placement"),   # kind still "layer": contradictory
    ],
)
def test_transformer_config_names_the_bad_field(kwargs, field):
    with pytest.raises(dl.ConfigError, match=field):
        dl.TransformerConfig(**kwargs)


def test_error_lists_allowed_values():
    with pytest.raises(dl.ConfigError) as err:
        dl.TransformerConfig(norm_placement="middle")
    assert "'post'" in str(err.value) and "'pre'" in str(err.value)


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (dl.MLPConfig, {"depth": -2}, "depth"),
        (dl.MLPConfig, {"activation": "elu"}, "activation"),
        (dl.TrainConfig, {"lr": 0.0}, "lr"),
        (dl.TrainConfig, {"optimizer": "lion"}, "optimizer"),
        (dl.TrainConfig, {"betas": (0.9, 1.2)}, "betas"),
        (dl.TrainConfig, {"warmup_steps": -1}, "warmup_steps"),
        (dl.TrainConfig, {"clip_norm": 0.0}, "clip_norm"),
        (dl.TrainConfig, {"amp": "int8"}, "amp"),
        (dl.TrainConfig, {"steps": 1.5}, "steps"),
    ],
)
def test_other_configs_name_the_bad_field(cls, kwargs, field):
    with pytest.raises(dl.ConfigError, match=field):
        cls(**kwargs)


def test_configs_are_frozen_and_replace_revalidates():
    cfg = dl.TransformerConfig()
    with pytest.raises(AttributeError):
        cfg.n_layers = 3  # type: ignore[misc]
    assert cfg.replace(n_layers=3).n_layers == 3
    with pytest.raises(dl.ConfigError, match="n_layers"):
        cfg.replace(n_layers=0)
    with pytest.raises(dl.ConfigError, match="n_layer"):
        cfg.replace(n_layer=3)


def test_final_norm_defaults_follow_placement():
    assert dl.TransformerConfig(norm_placement="pre").has_final_norm
    assert not dl.TransformerConfig(norm_placement="post").has_final_norm
    assert not dl.TransformerConfig(norm_placement="pre", final_norm=False).has_final_norm


def test_sequence_task_is_validated():
    with pytest.raises(dl.ConfigError, match="kind"):
        dl.SequenceTask("shuffle")
    with pytest.raises(dl.ConfigError, match="vocab"):
        dl.SequenceTask(vocab=2)


def test_norm_noise_needs_batchnorm():
    assert dl.MLPConfig(norm_kind="batch", norm_noise=0.3).norm_noise == 0.3
    with pytest.raises(dl.ConfigError, match="norm_noise"):
        dl.MLPConfig(norm_kind="layer", norm_noise=0.3)
    with pytest.raises(dl.ConfigError, match="norm_noise"):
        dl.MLPConfig(norm_kind="batch", norm_noise=-1.0)
