import pytest

import depthlab as dl


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"norm_placement": "middle"}, "norm_placement"),
        ({"norm_kind": "instance"}, "norm_kind"),
        ({"activation": "swish"}, "activation"),
        ({"init": "glorot"}, "init"),
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


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (dl.TrainConfig, {"lr": float("inf")}, "lr"),
        (dl.TrainConfig, {"lr": float("nan")}, "lr"),
        (dl.TrainConfig, {"weight_decay": float("inf")}, "weight_decay"),
        (dl.TransformerConfig, {"alpha_sa": float("inf")}, "alpha_sa"),
        (dl.TransformerConfig, {"causal": "no"}, "causal"),
        (dl.TransformerConfig, {"bias": 1}, "bias"),
        (dl.TransformerConfig, {"final_norm": "yes"}, "final_norm"),
        (dl.MLPConfig, {"bias": "no"}, "bias"),
        (dl.MLPConfig, {"residual": 0}, "residual"),
        (dl.TrainConfig, {"device": "gpu"}, "device"),
        (dl.TrainConfig, {"device": ""}, "device"),
        (dl.TrainConfig, {"progress": "yes"}, "progress"),
        (dl.TrainConfig, {"schedule": "step"}, "schedule"),
        (dl.TrainConfig, {"sync_every": 0}, "sync_every"),
        (dl.TransformerConfig, {"mlp_ratio": 0.001}, "mlp_ratio"),
    ],
)
def test_boundary_values_are_refused_at_construction(cls, kwargs, field):
    with pytest.raises(dl.ConfigError, match=field):
        cls(**kwargs)


def test_a_device_that_is_not_on_this_machine_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(dl.ConfigError, match="CUDA is not available"):
        dl.TrainConfig(device="cuda")
    assert dl.TrainConfig(device="cpu").device == "cpu"


def test_chapters_train_in_float32_unless_they_ask():
    """amp="auto" would switch a Colab GPU to bfloat16 and move a page's numbers."""
    assert dl.TrainConfig().amp == "off"


def test_token_ids_outside_the_vocabulary_name_the_field():
    import torch

    model = dl.SequenceModel(dl.TransformerConfig(d_model=16, n_heads=2, n_layers=1,
                                                  vocab_size=8, max_len=8))
    with pytest.raises(ValueError, match="vocab_size=8"):
        model(torch.tensor([[1, 2, 9]]))


def test_seeds_come_from_one_place_and_shift_with_the_offset(monkeypatch):
    monkeypatch.delenv("DEPTHLAB_SEED_OFFSET", raising=False)
    assert dl.seeds(3) == [0, 1, 2]
    assert dl.TrainConfig().seed == 0 and dl.SequenceTask().seed == 0
    monkeypatch.setenv("DEPTHLAB_SEED_OFFSET", "2")
    assert dl.seeds(3) == [2000, 2001, 2002]
    assert dl.TrainConfig().seed == 2000 and dl.SequenceTask().seed == 2000
    assert dl.TrainConfig(seed=5).seed == 5                       # an explicit seed wins
    monkeypatch.setenv("DEPTHLAB_SEED_OFFSET", "-1")
    with pytest.raises(ValueError, match="DEPTHLAB_SEED_OFFSET"):
        dl.seeds(1)
    with pytest.raises(ValueError, match="seeds"):
        dl.seeds(0)


def test_embed_std_sets_the_embeddings_and_must_be_positive():
    model = dl.SequenceModel(dl.TransformerConfig(d_model=64, n_layers=1, embed_std=0.1))
    assert abs(model.tok_emb.weight.std().item() / 0.1 - 1) < 0.2
    assert abs(model.pos_emb.weight.std().item() / 0.1 - 1) < 0.2
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="embed_std"):
            dl.TransformerConfig(embed_std=bad)
