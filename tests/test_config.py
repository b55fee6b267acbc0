import pytest

from clippy_ray import config


def test_yaml_plus_dotted_overrides_fill_the_dataclasses(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  aggregation: avg\n  image: {name: vit_small_patch16_224, timm_kwargs: {depth: 2}}\n")
    cfg = config.load(
        str(path),
        ["model.image.timm_kwargs={depth: 3}", "loss.chunk_size=4096", "model.token_keep_ratio=1", "train.lr=2e-3"],
    )
    assert cfg.model.aggregation == "avg"
    assert cfg.model.image.name == "vit_small_patch16_224"
    assert cfg.model.image.timm_kwargs == {"depth": 3}
    assert cfg.loss.chunk_size == 4096
    assert cfg.model.token_keep_ratio == 1.0 and isinstance(cfg.model.token_keep_ratio, float)
    assert cfg.train.lr == 0.002  # YAML reads 2e-3 as a string; float fields accept it
    assert config.from_dict(config.to_dict(cfg)) == cfg  # the resolved config reproduces the run


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["model.aggregation=maxx"], "model.aggregation: 'maxx' is not one of max, avg, cls"),
        (["model.imge.name=x"], "model.imge: unknown key (valid keys: image, text,"),
        (["model.embed_dim=wide"], "model.embed_dim: expected int, got 'wide'"),
        (["model.token_keep_ratio=1.5"], "model.token_keep_ratio: 1.5 must be in (0, 1]"),
        (["model.token_keep_ratio=0.5", "model.token_keep_count=10"], "set one, not both"),
        (["loss.matmul_dtype=fp8"], "loss.matmul_dtype: 'fp8' is not one of auto, bfloat16, float32"),
        (["model.image.timm_kwargs={num_classes: 10}"], "model.image.timm_kwargs.num_classes: set by clippy-ray"),
        (["data.block_mib=0"], "data.block_mib: 0 must be >= 1"),
        (["aggregation"], "overrides are key=value"),
        (["train.compile=true", "train.zero_stage=3"], "train.compile: ZeRO-3 gathers each parameter in hooks"),
        (["train.compile=true", "train.compile_backend=fast"], "train.compile_backend: 'fast' is not a torch.compile"),
    ],
)
def test_bad_fields_get_one_line_naming_the_field_and_the_fix(overrides, line):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, overrides)
    assert line in str(err.value)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(config.ConfigError) as err:
        config.load(None, ["model.embed_dim=0", "loss.chunk_size=0"])
    assert len(err.value.errors) == 2


def test_shipped_configs_are_valid():
    for name in ("configs/demo.yaml", "configs/vitb16_t5base.yaml"):
        config.load(name)


def test_worker_resources_take_custom_ray_resources_and_name_each_bad_entry():
    cfg = config.load(None, ["train.worker_resources={gpu_node: 1}", "eval.worker_resources={eval_node: 0.5}"])
    assert cfg.train.worker_resources == {"gpu_node": 1} and cfg.eval.worker_resources == {"eval_node": 0.5}
    assert config.TrainConfig().worker_resources == {} == config.EvalConfig().worker_resources
    with pytest.raises(config.ConfigError) as err:
        config.load(None, ["train.worker_resources={GPU: 1, a: 0, b: many}", "eval.worker_resources={CPU: 2}"])
    assert err.value.errors == [
        "train.worker_resources.GPU: a built-in Ray resource (CPUs and GPUs come from cpus_per_worker and "
        "use_gpu); list custom resources only, e.g. {gpu_node: 1}",
        "train.worker_resources.a: 0 must be a number > 0",
        "train.worker_resources.b: 'many' must be a number > 0",
        "eval.worker_resources.CPU: a built-in Ray resource (CPUs and GPUs come from cpus_per_worker and "
        "use_gpu); list custom resources only, e.g. {gpu_node: 1}",
    ]


def test_elastic_workers_keep_the_micro_batch_and_the_global_batch_through_the_accumulation():
    cfg = config.load(None, ["train.num_workers=[1, 2]", "train.global_batch_size=64"])
    t = cfg.train
    assert (t.elastic, t.min_workers, t.max_workers, t.micro_batch_size) == (True, 1, 2, 32)
    assert [t.grad_accum_at(w) * w * t.micro_batch_size for w in (1, 2)] == [64, 64]
    assert config.from_dict(config.to_dict(cfg)) == cfg  # a resolved config with a range reproduces the run
    cfg = config.load(None, ["train.num_workers=[2, 3]", "train.global_batch_size=36", "train.grad_accum_steps=2"])
    assert [cfg.train.grad_accum_at(w) for w in (2, 3)] == [3, 2]  # 6 micro-batches of 6 pairs, any size


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["train.num_workers=[2, 1]"], "train.num_workers: [2, 1] must be a number >= 1 or [min, max] with 1 <= min"),
        (["train.num_workers=[0, 2]"], "train.num_workers: [0, 2] must be a number >= 1 or [min, max]"),
        (["train.num_workers=[1, 2, 3]"], "train.num_workers: [1, 2, 3] must be a number >= 1 or [min, max]"),
        (
            ["train.num_workers=[2, 4]", "train.global_batch_size=64"],
            "train.num_workers: [2, 4]: a step is 4 micro-batches (max workers x grad_accum_steps), which 3 workers "
            "cannot share evenly, so the global batch could not stay the same; every size from min to max must "
            "divide 4: use num_workers=[4, 4], or grad_accum_steps=3 (and a global_batch_size that is a "
            "multiple of 12)",
        ),
    ],
)
def test_an_elastic_range_the_global_batch_cannot_follow_is_refused_with_the_fix(overrides, line):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, overrides)
    assert line in str(err.value)
