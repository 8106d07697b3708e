"""pipelines.eval.fid and .inception: the Frechet distance against known answers and scipy, the Inception-v3
trunk in torchvision's layout loaded from a file, features, FID and the reference cache."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from pipelines.eval import fid as fid_mod
from pipelines.eval.fid import frechet_distance, pool_features, reference_statistics, statistics
from pipelines.eval.inception import InceptionV3, load_inception

from tests.pipelines.eval.eval_models import save_random_inception

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# torchvision's Inception_V3_Weights.IMAGENET1K_V1 meta: num_params 27,161,264 with the auxiliary head, which
# holds conv0 768*128 + 2*128, conv1 128*768*25 + 2*768 and fc 768*1000 + 1000 = 3,326,696 parameters.
TORCHVISION_PARAMS = 27_161_264 - 3_326_696  # 23,834,568
# Key names and shapes as torchvision's models/inception.py builds them (Inception3, aux_logits=False).
TORCHVISION_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_4a_3x3.bn.running_var": (192,),
                    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
                    "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
                    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
                    "Mixed_6b.branch7x7dbl_5.conv.weight": (192, 128, 1, 7),
                    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
                    "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
                    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1), "fc.weight": (1000, 2048)}


def random_psd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def scipy_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy.linalg.sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_known_answers_and_scipy():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_psd(rng, d), random_psd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)  # equal covs
    a, b = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)  # diagonal: sum (sqrt a - sqrt b)^2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == \
        pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fid(mu1, s1, mu2, s2), rel=1e-7)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    features = rng.normal(size=(50, d))
    same = statistics(features)
    assert abs(frechet_distance(same.mu, same.sigma, same.mu, same.sigma)) < 1e-9 and same.count == 50


def test_frechet_distance_stays_finite_on_singular_covariances():
    """Fewer images than dimensions (every stage's case with 2048-d features): rank-deficient covariances."""
    rng = np.random.default_rng(1)
    d = 64
    s1, s2 = random_psd(rng, d, rank=10), random_psd(rng, d, rank=10)
    mu = np.zeros(d)
    value = frechet_distance(mu, s1, mu, s2)
    eps = np.eye(d) * 1e-6  # the sqrtm route needs an offset here; the eigen route does not
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(scipy_fid(mu, s1 + eps, mu, s2 + eps), rel=1e-3)
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(mu, s1, mu[:3], s2)


def test_inception_matches_torchvision_layout_and_size():
    model = InceptionV3("torchvision")
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS
    assert sum(p.numel() for p in InceptionV3("fid").parameters()) == TORCHVISION_PARAMS + 8 * 2048 + 8  # 1008 classes
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: shapes.get(k) for k in TORCHVISION_KEYS} == TORCHVISION_KEYS
    assert sum(k.endswith(".conv.weight") for k in shapes) == 94


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception_v3_google-random.pth")


def image_set(colors, size=48, seed=0):
    """Images of a flat colour with a little noise each (so their features vary)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(np.array(c) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8))
            for c in colors]


def test_loaded_weights_give_features_and_fid(weights):
    model = load_inception(str(weights), variant="torchvision")
    file_keys = set(torch.load(weights, weights_only=True))
    assert any(k.startswith("AuxLogits.") for k in file_keys)  # dropped on load, as documented
    assert set(model.state_dict()) == {k for k in file_keys if not k.startswith("AuxLogits.")}
    a = image_set([(200, 40, 40)] * 2 + [(40, 40, 200)] * 2)
    b = image_set([(255, 255, 255)] * 2 + [(20, 200, 20)] * 2, seed=1)
    features = pool_features(model, a, batch_size=3)  # two batches
    assert features.shape == (4, 2048) and np.isfinite(features).all()
    ref_a = statistics(features)
    assert features.var(axis=0).sum() > 1.0  # features that tell images apart
    assert fid_mod.fid(a, model=model, reference=ref_a, batch_size=3) == pytest.approx(0, abs=1e-6)
    assert fid_mod.fid(b, model=model, reference=ref_a) > 1.0


def test_fid_variant_pools_differently(weights, tmp_path):
    fid_weights = save_random_inception(tmp_path / "pt_inception-random.pth", variant="fid")
    torchvision_model = load_inception(str(weights), variant="torchvision")
    fid_model = load_inception(str(fid_weights), variant="fid")
    fid_model.load_state_dict({**torchvision_model.state_dict(), "fc.weight": fid_model.fc.weight,
                               "fc.bias": fid_model.fc.bias})  # same trunk: only the pools differ
    images = image_set([(200, 40, 40), (40, 40, 200)])
    assert not np.allclose(pool_features(torchvision_model, images), pool_features(fid_model, images), atol=1e-4)
    with pytest.raises(ValueError, match="use variant='fid'"):
        load_inception(str(fid_weights), variant="torchvision")


def test_wrong_keys_are_refused_by_name(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    state["Mixed_5b.branch_pool_renamed.conv.weight"] = state.pop("Mixed_5b.branch_pool.conv.weight")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"missing keys Mixed_5b\.branch_pool\.conv\.weight, unexpected keys "
                                         r"Mixed_5b\.branch_pool_renamed\.conv\.weight"):
        load_inception(str(bad), variant="torchvision")
    with pytest.raises(FileNotFoundError, match="no Inception weights file at"):
        load_inception(str(tmp_path / "missing.pth"))


def test_safetensors_and_offline_hub_cache(weights, tmp_path, monkeypatch):
    """A .safetensors copy loads too; a hub id resolves from the local hub cache with HF_HUB_OFFLINE set."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in torch.load(weights, weights_only=True).items()
             if not k.endswith("num_batches_tracked")}  # as a file written before PyTorch 0.4.1 has none
    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--someone--inception" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state, snapshot / "inception.safetensors")
    (tmp_path / "hub" / "models--someone--inception" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--inception" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_file = load_inception("someone/inception/inception.safetensors", variant="torchvision")
    by_repo = load_inception("someone/inception", variant="torchvision")
    assert torch.equal(by_file.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    assert by_repo.weights_digest == by_file.weights_digest
    with pytest.raises(FileNotFoundError, match="hub repo 'someone/other'.*HF_HUB_OFFLINE"):
        load_inception("someone/other", variant="torchvision")


def test_reference_statistics_are_cached_by_files_and_weights(weights, tmp_path):
    model = load_inception(str(weights), variant="torchvision")
    folder = tmp_path / "reference"
    folder.mkdir()
    for i, image in enumerate(image_set([(200, 40, 40), (40, 40, 200), (230, 230, 230)])):
        image.save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    cache = tmp_path / "cache"
    first = reference_statistics(str(folder), model=model, cache_dir=cache)
    assert first.count == 3 and len(list(cache.glob("*.npz"))) == 1
    model.Mixed_7c.branch1x1.conv.weight.data.zero_()  # the cache must answer without computing again
    again = reference_statistics(str(folder), model=model, cache_dir=cache)
    assert np.array_equal(again.sigma, first.sigma)
    image_set([(0, 0, 0)])[0].save(folder / "3.png")  # another file: another key, computed anew
    grown = reference_statistics(str(folder), model=model, cache_dir=cache)
    assert grown.count == 4 and len(list(cache.glob("*.npz"))) == 2
    with pytest.raises(FileNotFoundError, match="no folder at"):
        reference_statistics(str(tmp_path / "nowhere"), model=model, cache_dir=cache)
