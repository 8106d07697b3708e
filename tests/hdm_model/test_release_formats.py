"""Import and export of the original's release formats (hdm_formats 1-2) against fixtures built the way the
original builds them (tests/hdm_model/original_layouts.py), never by our exporter or our key table."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from safetensors.torch import load_file, save_file

from hdm_model import (HDMPipeline, LatentVAE, TextEncoder, XUTConfig, build_denoiser, load_official_hdm,
                       ours_to_official, save_official_hdm)
from hdm_model.official import official_to_ours

from ..tiny_models import make_tiny_text_encoder, make_tiny_vae
from .conftest import _randomise_zero_inits, tiny_inputs
from .original_layouts import (XUDiTConditionModel, arch_of, converter_file_state, spec_shapes, spec_state,
                               spec_time_table)

FILE_MEAN, FILE_STD = [0.5, 0.25, -0.5, 1.0], [3.0, 2.5, 0.75, 1.25]  # differ from the tiny VAE's config
CONFIG = XUTConfig.preset("tiny")
ARCH = arch_of(CONFIG)
SMALL = dict(width=64, height=48, steps=2, seeds=0)


class HDMXUTPipeline(DiffusionPipeline):
    """The original pipeline's registration (src/hdm/pipeline.py), to let diffusers write model_index.json."""

    def __init__(self, transformer, text_encoder, tokenizer, vae, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae,
                              scheduler=scheduler)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The spec's fp32 source weights, the converter's fp16 single file, and the diffusers folder."""
    root = tmp_path_factory.mktemp("release")
    te_dir, vae_dir = make_tiny_text_encoder(root / "te"), make_tiny_vae(root / "vae")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    source = spec_state(ARCH)
    file_state = converter_file_state(source, vae.state_dict(), vae_mean=FILE_MEAN, vae_std=FILE_STD)
    save_file(file_state, root / "hdm.safetensors")
    transformer = XUDiTConditionModel(**{k: v for k, v in ARCH.items()})
    transformer.model.load_state_dict(source)
    text_encoder = TextEncoder.from_pretrained(str(te_dir))
    pipe = HDMXUTPipeline(transformer.half(), text_encoder.model, text_encoder.tokenizer, vae, None)
    pipe.save_pretrained(root / "folder")
    return dict(root=root, source=source, file_state=file_state, file=root / "hdm.safetensors",
                folder=root / "folder", te_dir=te_dir, vae_dir=vae_dir, text_encoder=text_encoder)


def velocity(model):
    x, t, ctx = tiny_inputs(model.config)
    return model.eval()(x, t, ctx, aspect=torch.tensor([0.3, -0.2]))


def fp32_model(state: dict) -> torch.nn.Module:
    """Our denoiser with `state` (XUDiT names) in fp32, through the same key table."""
    return load_official_hdm({k: v.float() for k, v in state.items()}, ARCH)


@pytest.mark.parametrize("layout", ["file", "folder", "transformer"])
def test_release_imports_give_the_outputs_of_their_weights(release, layout, capsys):
    where = {"file": release["file"], "folder": release["folder"], "transformer": release["folder"] / "transformer"}
    loaded = load_official_hdm(where[layout], ARCH if layout == "file" else None)
    assert loaded.config == CONFIG  # the folder's arch comes from transformer/config.json
    fp16_weights = {k[len("unet.model."):]: v for k, v in release["file_state"].items() if k.startswith("unet.model.")}
    out, reference = velocity(loaded), velocity(fp32_model(release["source"]))
    same_fp16 = (out - velocity(fp32_model(fp16_weights))).abs().max().item()
    from_fp32 = (out - reference).abs().max().item()
    scale = reference.abs().max().item()
    with capsys.disabled():
        print(f"\n{layout}: max |out - out(same fp16 weights in fp32)| = {same_fp16:.3g}, "
              f"max |out - out(fp32 source)| = {from_fp32:.3g} (max |out| {scale:.3g})")
    assert same_fp16 == 0
    assert 0 < from_fp32 < 2e-3 * scale  # fp16 storage of the weights (2^-11 relative each), nothing else


def test_compiled_unet_prefix_is_stripped(release):
    state = {k.replace("unet.model.", "unet._orig_mod.model."): v for k, v in release["file_state"].items()}
    assert torch.equal(velocity(load_official_hdm(state, ARCH)), velocity(load_official_hdm(release["file"], ARCH)))


def test_lycoris_and_foreign_keys_and_time_tables_are_refused(release):
    state = {**release["file_state"], "lycoris_model.lora_unet_x.lokr_w1": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="LyCORIS fine-tune.*not a plain denoiser"):
        load_official_hdm(state, ARCH)
    with pytest.raises(KeyError, match=r"unexpected keys: ema_decay"):
        load_official_hdm({**release["file_state"], "ema_decay": torch.zeros(1)}, ARCH)
    for period in (1000.0, 10000.0 * 1.01):  # another period; a table off by 1 % (fp16 eps is 0.1 %)
        half = CONFIG.dim // 2
        table = torch.exp(-torch.log(torch.tensor(period)) * torch.arange(half) / half)[None]
        with pytest.raises(ValueError, match="time_emb.freqs differs"):
            load_official_hdm({**release["file_state"], "unet.model.time_emb.freqs": table.half()}, ARCH)
    # the fp16 table is accepted (the release); so is it cast back to fp32, and the exact fp32 one
    for table in (spec_time_table(CONFIG.dim).half().float(), spec_time_table(CONFIG.dim)):
        load_official_hdm({**release["file_state"], "unet.model.time_emb.freqs": table}, ARCH)


class _Sentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this touches the sentinel file
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("name", ["hdm.ckpt", "hdm.safetensors", "hdm.bin"])
def test_pickles_are_refused_without_unpickling(tmp_path, name):
    sentinel = tmp_path / "unpickled"
    path = tmp_path / name
    if name.endswith(".bin"):
        torch.save({"state_dict": {"x": _Sentinel(sentinel)}}, path)  # torch.save's zip container
    else:
        path.write_bytes(pickle.dumps({"state_dict": _Sentinel(sentinel)}, protocol=2))
    with pytest.raises(ValueError, match="pickled checkpoint.*ckpt_converter.py"):
        load_official_hdm(path, ARCH)
    with pytest.raises(ValueError, match="pickled checkpoint"):
        HDMPipeline.from_official(path, arch=ARCH)
    assert not sentinel.exists()
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(ARCH))
    torch.save({"x": _Sentinel(sentinel)}, tmp_path / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled checkpoint"):
        load_official_hdm(tmp_path)
    assert not sentinel.exists()


def test_pipeline_from_the_file_uses_its_vae_and_latent_statistics(release):
    pipe = HDMPipeline.from_official(release["file"], arch=ARCH, vae_config=str(release["vae_dir"]),
                                     text_encoder=str(release["te_dir"]), dtype=torch.float32)
    assert pipe.vae.mean.flatten().tolist() == torch.tensor(FILE_MEAN).half().tolist()
    assert pipe.vae.std.flatten().tolist() == torch.tensor(FILE_STD).half().tolist()
    assert pipe.vae.mean.flatten().tolist() != AutoencoderKL.load_config(release["vae_dir"])["latents_mean"]
    assert pipe(["red square"], **SMALL)[0].size == (64, 48)


def test_pipeline_from_the_folder_uses_its_vae_and_text_encoder(release):
    pipe = HDMPipeline.from_official(release["folder"], dtype=torch.float32)
    assert pipe.vae.mean.flatten().tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0])  # tiny VAE's config
    theirs = release["text_encoder"].model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in pipe.text_encoder.model.state_dict().items())
    assert pipe(["red square"], **SMALL)[0].size == (64, 48)


# -- export --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ours(release):
    torch.manual_seed(0)
    model = build_denoiser(CONFIG)
    _randomise_zero_inits(model)
    return model.eval()


def test_file_export_is_the_converters_layout_and_round_trips(release, ours, tmp_path):
    vae = LatentVAE.from_pretrained(str(release["vae_dir"]))
    path = save_official_hdm(ours, tmp_path / "mine.safetensors", vae=vae)
    state = load_file(path)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in release["file_state"].items()}  # the converter's keys and shapes
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert state["vae_mean"].flatten().tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0], abs=1e-3)
    loaded = load_official_hdm(path, ARCH)
    expected = {k: v.half().float() for k, v in ours.state_dict().items()}
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(velocity(loaded), velocity(load_official_hdm(ours_to_official(ours), ARCH).half().float()))


def test_folder_export_loads_strictly_into_the_original_class_and_round_trips(release, ours, tmp_path):
    vae = LatentVAE.from_pretrained(str(release["vae_dir"]))
    folder = save_official_hdm(ours, tmp_path / "mine", vae=vae, layout="diffusers",
                               text_encoder=release["text_encoder"])
    transformer, info = XUDiTConditionModel.from_pretrained(folder / "transformer", output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    ours_named = official_to_ours({k: v for k, v in transformer.model.state_dict().items()}, CONFIG)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in ours_named.items())
    theirs = json.loads((release["folder"] / "transformer" / "config.json").read_text())
    mine = json.loads((folder / "transformer" / "config.json").read_text())
    assert mine == theirs  # what diffusers' save_pretrained writes for the original class, with this arch
    index, their_index = (json.loads((f / "model_index.json").read_text()) for f in (folder, release["folder"]))
    assert index.pop("transformer") == ["hdm.modules.xut", "XUDiTConditionModel"]
    their_index.pop("transformer")  # the stand-in's module path
    assert index == their_index
    loaded = HDMPipeline.from_official(folder, dtype=torch.float32)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.denoiser.state_dict().items())
    assert torch.equal(loaded.vae.mean, vae.mean) and torch.equal(loaded.vae.std, vae.std)


@pytest.mark.parametrize("preset", ["tiny", "xut-small", "xut-base", "xut-large"])
def test_exported_keys_are_the_spec_table_for_every_preset(preset):
    config = XUTConfig.preset(preset)
    with torch.device("meta"):
        model = build_denoiser(config)
        transformer = XUDiTConditionModel(**arch_of(config))
    exported = {k: tuple(v.shape) for k, v in ours_to_official(model, prefix="").items()}
    assert exported == spec_shapes(arch_of(config))
    wrapper = {k: tuple(v.shape) for k, v in transformer.state_dict().items()}
    assert {f"model.{k}": v for k, v in exported.items()} == wrapper
