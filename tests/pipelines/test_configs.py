import pytest
from pydantic import ValidationError

from pipelines.config import load_config
from pipelines.data.config import PrecomputeConfig
from pipelines.train.config import RECIPE, TrainStageConfig, derive_params


def test_defaults_and_sorting():
    config = PrecomputeConfig(input="in", output="out", resolutions=[512, 256])
    assert config.resolutions == [256, 512]
    assert config.vae == "KBlueLeaf/EQ-SDXL-VAE" and config.caption.mode == "keep"


@pytest.mark.parametrize("fields, message", [
    (dict(resolutions=[250]), "multiples of 16"),
    (dict(resolutions=[256, 256]), "repeat"),
    (dict(batch_sise=4), "Extra inputs are not permitted"),
    (dict(caption={"mode": "model"}), "caption.model"),
    (dict(input="gs://bucket/x"), "s3://"),
    (dict(max_aspect=0.5), "greater than or equal to 1"),
])
def test_invalid_configs_say_why(fields, message):
    with pytest.raises(ValidationError, match=message):
        PrecomputeConfig(**{"input": "in", "output": "out", **fields})


def test_flags_override_the_toml_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('input = "a"\noutput = "b"\nresolutions = [256]\nbatch_size = 8\n'
                    '[caption]\nmode = "model"\nmodel = "x/y"\n')
    config = load_config(PrecomputeConfig, path, {"batch_size": 32, "caption.policy": "append", "vae": None})
    assert config.batch_size == 32 and config.caption.policy == "append" and config.caption.model == "x/y"
    assert config.vae == "KBlueLeaf/EQ-SDXL-VAE"  # None means: not given on the command line


def test_job_command_line(tmp_path):
    from jobs.precompute_latents import parse_args

    config = parse_args(["--input", "s3://b/in", "--output", "out/", "--res", "256", "512", "--no-std",
                         "--caption-mode", "model", "--caption-model", "m", "--s3-endpoint", "http://127.0.0.1:1"])
    assert config.input == "s3://b/in" and config.output == "out" and config.resolutions == [256, 512]
    assert config.store_std is False and config.caption.model == "m"
    assert config.s3.endpoint_url == "http://127.0.0.1:1"


def test_default_vae_matches_the_model_package_and_configs_do_not_import_torch():
    import subprocess
    import sys

    from hdm_model.vae import DEFAULT_VAE as MODEL_DEFAULT
    from pipelines.config import DEFAULT_VAE

    assert DEFAULT_VAE == MODEL_DEFAULT
    # Ray Data's read/write workers import pipelines.data.precompute: torch there costs seconds of CPU per worker
    probe = "import sys, pipelines.data.precompute; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_derived_stage_follows_the_new_recipe_and_keeps_values_set_on_purpose():
    first = TrainStageConfig(res=256, latents="l", storage="s", name="mine", batch_size=16, ema_decay=0.999, steps=5,
                             base_lr=RECIPE[256]["base_lr"])  # the recipe's value, as if written out
    second = first.derive(res=512, steps=7)
    recipe = ("base_lr", "betas", "grad_accum")
    assert (second.base_lr, second.betas, second.grad_accum) == tuple(RECIPE[512][k] for k in recipe)
    assert (second.batch_size, second.ema_decay, second.steps, second.run_name) == (16, 0.999, 7, "train-512")
    assert first.derive(res=512, batch_size=8).batch_size == 8  # an override wins

    # the same rule on the params as written (what a DAG stage's `extends` uses): recipe values at the parent's
    # resolution are dropped (betas as TOML writes them, a list), the rest carries over, the name does not
    parent = {"res": 256, "name": "mine", "betas": [0.9, 0.98], "grad_accum": 1, "sample": {"every": 5}}
    assert derive_params(parent, {"res": 512}) == {"res": 512, "grad_accum": 1, "sample": {"every": 5}}
    assert derive_params({"model": "tiny"}, {"res": 64}) == {"model": "tiny", "res": 64}


def test_training_speed_options_and_the_checkpointing_of_older_configs():
    """`checkpointing` is a policy now; a config (or a stage's logged params) written with the old boolean
    still validates, as the policy it meant. Compile, the text encoder's attention and DDP are options."""
    base = dict(latents="l", storage="s", res=256)
    assert TrainStageConfig(**base).checkpointing == RECIPE[256]["checkpointing"]
    assert TrainStageConfig(**base, grad_checkpointing=False).checkpointing == "none"
    assert TrainStageConfig(**base, grad_checkpointing=True).checkpointing == "full"
    assert TrainStageConfig(**base, grad_checkpointing=True, checkpointing="mlp").checkpointing == "mlp"
    config = TrainStageConfig(**base, compile="blocks", ddp={"static_graph": True, "bucket_cap_mb": 100})
    assert config.compile == "blocks" and config.ddp.static_graph and config.ddp.gradient_as_bucket_view
    assert TrainStageConfig(**base).compile == "auto" and TrainStageConfig(**base).text_attn == "sdpa"
    for bad, message in ((dict(checkpointing="some"), "checkpointing"), (dict(compile="max"), "compile"),
                         (dict(ddp={"bucket_mb": 1}), "Extra inputs")):
        with pytest.raises(ValidationError, match=message):
            TrainStageConfig(**base, **bad)
