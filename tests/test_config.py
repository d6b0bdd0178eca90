import pytest
import torch

from alcot.model import LADDER, ConfigError, ModelConfig, count_parameters


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=100, num_attention_heads=3), "model.hidden_size"),
        (
            dict(num_attention_heads=4, num_query_groups=4, tensor_parallel_size=3),
            "model.tensor_parallel_size",
        ),
        (dict(halting={"tau": 1.5}), "model.halting.tau"),
        (dict(halting={"tau": 0.0}), "model.halting.tau"),
        (dict(l_max=-1), "model.l_max"),
        (dict(method="recurrent"), "model.method"),
        (dict(size="7b"), "model.size"),
        (dict(halting={"router": "transformer"}), "model.halting.router"),
        (dict(halting={"lambda": -1.0}), "model.halting.lambda"),
        (dict(mix="average"), "model.mix"),
        (dict(num_query_groups=3), "model.num_query_groups"),
        (dict(pipeline_parallel_size=3), "model.pipeline_parallel_size"),
        (dict(l_max=1.5), "model.l_max"),
        (dict(method="looped", l_max=0), "model.l_max"),
        (dict(widht=3), "model.widht"),
        (dict(halting={"tua": 0.1}), "model.halting.tua"),
        (dict(halting={"router_init": "uniform"}), "model.halting.router_init"),
        (dict(halting={"detach_router_input": "yes"}), "model.halting.detach_router_input"),
        (dict(ponder_update="replace"), "model.ponder_update"),
        (dict(embed_scale=0.0), "model.embed_scale"),
        (dict(method="mor", l_max=0), "model.l_max"),
        (dict(method="mor", mor={"alpha": 0.0}), "model.mor.alpha"),
        (dict(method="mor", mor={"threshold": 1.0}), "model.mor.threshold"),
        (dict(method="mor", mor={"capacity": [0.5]}), "model.mor.capacity"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    base = dict(size="tiny")
    base.update(overrides)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(base)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


def test_lambda_round_trips_under_its_yaml_name():
    cfg = ModelConfig.from_dict({"halting": {"lambda": 0.3}})
    assert cfg.halting.lambda_ == 0.3
    d = cfg.to_dict()
    assert d["halting"]["lambda"] == 0.3 and "lambda_" not in d["halting"]
    assert ModelConfig.from_dict(d) == cfg


def test_vanilla_has_no_latent_steps():
    assert ModelConfig(method="vanilla", l_max=3).l_max == 0


@pytest.mark.parametrize(
    "size, expected", [("70m", 70e6), ("160m", 160e6), ("410m", 410e6), ("1.4b", 1.4e9)]
)
def test_ladder_sizes_are_what_their_names_say(size, expected):
    total = count_parameters(ModelConfig(size=size, method="vanilla"))["total"]
    assert abs(total - expected) / expected < 0.05, total


def test_tiny_is_about_a_million_parameters():
    counts = count_parameters(ModelConfig(size="tiny", method="vanilla"))
    assert 0.5e6 < counts["total"] < 2e6
    assert list(LADDER)[:5] == ["pico", "nano", "micro", "tiny", "mini"]
    sizes = [count_parameters(ModelConfig(size=n, method="vanilla"))["total"] for n in LADDER]
    assert sizes == sorted(sizes)  # the ladder goes up


@pytest.mark.parametrize(
    "overrides",
    [
        dict(method="vanilla"),
        dict(method="adaptive"),
        dict(method="adaptive", halting={"router": "per_step"}),
        dict(method="adaptive", halting={"router": "mlp"}),
        dict(method="pause", l_max=2),
        dict(method="ponder"),
        dict(method="looped"),
        dict(method="fixed"),
        dict(method="mor"),
    ],
)
def test_parameter_count_matches_the_built_model(build, overrides):
    model = build(**overrides)
    built = sum(p.numel() for p in model.parameters())
    assert built == count_parameters(model.cfg)["total"]


def test_model_refuses_a_mismatched_process_group(parallel):
    from alcot.model import AlcotModel

    cfg = ModelConfig(size="tiny", num_attention_heads=4, tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match="tensor_parallel_size"):
        AlcotModel(cfg)
    assert torch.distributed.is_initialized()


def test_canonical_config_drops_what_cannot_matter():
    a = ModelConfig.from_dict({"method": "vanilla", "halting": {"lambda": 0.5}, "l_max": 3})
    b = ModelConfig.from_dict({"method": "vanilla", "halting": {"lambda": 0.1}})
    assert a != b and a.canonical() == b.canonical()
    c = ModelConfig.from_dict({"method": "adaptive", "halting": {"lambda": 0.5}})
    assert c.canonical().halting.lambda_ == 0.5
    d = ModelConfig.from_dict({"method": "fixed", "halting": {"tau": 0.3}, "mix": "distribution"})
    assert d.canonical().halting.tau == 0.1 and d.canonical().mix == "distribution"


def test_config_errors_survive_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("data.path", "missing")))
    assert err.field == "data.path" and str(err) == "data.path: missing"


def test_embed_scale_defaults_to_sqrt_2_5_d_for_every_method():
    import math

    for method in ("vanilla", "adaptive", "looped", "pause", "ponder", "fixed", "mor"):
        for size in ("tiny", "70m"):
            cfg = ModelConfig.from_dict({"size": size, "method": method})
            assert cfg.embed_scale == pytest.approx(math.sqrt(2.5 * cfg.hidden_size))
    assert ModelConfig.from_dict({"size": "tiny", "embed_scale": 1}).embed_scale == 1.0
    # computed from the size actually used, including an explicit width
    assert ModelConfig.from_dict({"hidden_size": 64}).embed_scale == pytest.approx(math.sqrt(160))
    # the default and the same number written out are one identity
    a = ModelConfig.from_dict({"size": "tiny"})
    b = ModelConfig.from_dict({"size": "tiny", "embed_scale": math.sqrt(2.5 * 128)})
    assert a == b


def test_pause_vectors_are_embedding_parameters():
    pause = count_parameters(ModelConfig.from_dict({"method": "pause", "l_max": 3}))
    vanilla = count_parameters(ModelConfig.from_dict({"method": "vanilla"}))
    assert pause["non_embedding"] == vanilla["non_embedding"]
    assert pause["embedding"] == vanilla["embedding"] + 3 * 128
    assert pause["total"] == vanilla["total"] + 3 * 128


def test_canonical_config_resets_method_specific_sections():
    a = ModelConfig.from_dict({"method": "vanilla", "ponder_update": "reset", "mor": {"alpha": 1}})
    b = ModelConfig.from_dict({"method": "vanilla"})
    assert a.canonical() == b.canonical()
    p = ModelConfig.from_dict({"method": "ponder", "ponder_update": "reset"})
    assert p.canonical().ponder_update == "reset"
    m = ModelConfig.from_dict({"method": "mor", "mor": {"alpha": 1}})
    assert m.canonical().mor.alpha == 1.0


def test_warmup_steps_override_the_fraction_and_stay_out_of_older_identities():
    from alcot.model.trainer import TrainerConfig, lr_lambda
    from alcot.orchestrator.config import config_hash, load_run_config

    f = lr_lambda(TrainerConfig(steps=1000, warmup_frac=0.02, warmup_steps=50))
    assert f(0) == pytest.approx(1 / 50) and f(49) == pytest.approx(1.0) and f(50) <= 1.0
    g = lr_lambda(TrainerConfig(steps=1000, warmup_frac=0.02))
    assert g(19) == pytest.approx(1.0) and g(0) == pytest.approx(1 / 20)
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        TrainerConfig(warmup_steps=-1)
    base = load_run_config("configs/train_adaptive.yaml")
    same = load_run_config("configs/train_adaptive.yaml", ["train.warmup_steps=0"])
    other = load_run_config("configs/train_adaptive.yaml", ["train.warmup_steps=50"])
    assert config_hash(base) == config_hash(same) != config_hash(other)


def test_the_parallel_layout_is_not_part_of_a_runs_identity():
    # The same run at TP = 2 or PP = 2 is the same trial (checkpoints reshard across layouts);
    # identities recorded at TP = PP = 1 stay what they were (the committed study's hashes).
    from alcot.orchestrator.config import config_hash, load_run_config

    sets = ["model.num_layers=4"]
    one = load_run_config("configs/train_adaptive.yaml", sets)
    tp2 = load_run_config("configs/train_adaptive.yaml", [*sets, "model.tensor_parallel_size=2"])
    pp2 = load_run_config("configs/train_adaptive.yaml", [*sets, "model.pipeline_parallel_size=2"])
    assert config_hash(one) == config_hash(tp2) == config_hash(pp2)
    other = load_run_config("configs/train_adaptive.yaml", [*sets, "model.l_max=2"])
    assert config_hash(other) != config_hash(one)
