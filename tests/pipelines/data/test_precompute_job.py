"""The latent precompute job end to end on a real local Ray cluster (integration)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from hdm_model import LatentVAE
from pipelines import progress
from pipelines.config import S3Options
from pipelines.data.config import PrecomputeConfig
from pipelines.data.images import TransformSpec, decode_image, resize_for_resolution
from pipelines.data.latent_store import LATENT_SCHEMA, decode_latent, vae_weights_digest
from pipelines.storage import s3_filesystem, upload

from tests.image_cases import LARGE, MAX_PIXELS, SMALL, cases, write_folder
from tests.tiny_models import make_tiny_captioner, make_tiny_vae
from tests.pipelines.helpers import ray_job_submit, read_parts

pytestmark = pytest.mark.integration
JOB = "jobs/precompute_latents.py"
RES = [SMALL, LARGE]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "vae")



def run_in_process(**fields):
    from pipelines.data.precompute import run_precompute

    return run_precompute(PrecomputeConfig(**fields))


def job_args(input: str, output: str, vae: Path, *extra: str) -> list[str]:
    return [JOB, "--input", input, "--output", output, "--res", *map(str, RES), "--vae", str(vae),
            "--max-pixels", str(MAX_PIXELS), "--batch-size", "4", *extra]


def progress_of(output: str) -> list[tuple[int, int | None]]:
    """(done, total) of the job's progress lines (pipelines/progress.py), in order."""
    return [(p.done, p.total) for p in map(progress.parse, output.splitlines()) if p is not None and p.unit == "image"]


def check_counts(fs, root: str, expected_keys: dict[int, set[str]], n_inputs: int) -> dict:
    """rows + errors = inputs at every resolution; each key once; returns rows and errors by key."""
    errors = read_parts(fs, f"{root}/errors")
    out = {"errors": errors}
    for res in RES:
        rows = read_parts(fs, f"{root}/res={res}")
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)), f"duplicate keys at res={res}"
        assert set(keys) == expected_keys[res]
        errs = [e for e in errors if e["res"] in (None, res)]
        assert len(rows) + len(errs) == n_inputs, (res, len(rows), len(errs))
        out[res] = {r["key"]: r for r in rows}
    return out


def test_folder_job_via_ray_job_submit(ray_cluster, vae_dir, tmp_path):
    selected = write_folder(tmp_path / "images")
    result = ray_job_submit(ray_cluster, job_args(str(tmp_path / "images"), str(tmp_path / "latents"), vae_dir))
    assert result.returncode == 0, result.output[-4000:]
    assert "rows written this run: res=32: 13, res=64: 12" in result.output
    lines = progress_of(result.output)  # every input written, as latents or errors, of the listing's count
    assert lines[-1] == (len(selected), len(selected)) and {t for _, t in lines} == {len(selected)}, lines
    assert [d for d, _ in lines] == sorted(d for d, _ in lines)
    fs = pafs.LocalFileSystem()
    root = str(tmp_path / "latents")
    ok = {res: {c.name for c in selected if c.expected[res] is None} for res in RES}
    got = check_counts(fs, root, ok, len(selected))

    # every bad input has its reason, once, at the right resolution(s)
    reasons = {(e["key"], e["res"]): e["reason_code"] for e in got["errors"]}
    assert all(e["reason"].startswith(e["reason_code"]) for e in got["errors"])  # the full text stays
    for case in selected:
        bad = {res: reason for res, reason in case.expected.items() if reason}
        if len(bad) == len(RES):
            assert reasons[(case.name, None)] == bad[SMALL]
        for res, reason in bad.items():
            if len(bad) < len(RES):
                assert reasons[(case.name, res)] == reason

    # schema, captions, geometry
    table = pq.read_table(next((tmp_path / "latents" / f"res={SMALL}").glob("*.parquet")))
    assert table.schema.equals(LATENT_SCHEMA, check_metadata=False)
    rows = got[LARGE]
    assert rows["rgb.jpg"]["caption"] == "a gradient, jpeg" and rows["rgb.jpg"]["caption_source"] == "sidecar"
    assert rows["gray.png"]["caption"] == "" and rows["gray.png"]["caption_source"] == "none"
    rotated = rows["rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (64, 96)  # EXIF orientation applied
    assert rotated["latent_shape"] == [4, 96 // 8, 64 // 8]
    pano = rows["panorama.png"]
    assert (pano["resized_width"], pano["resized_height"]) == (3 * LARGE, LARGE)  # capped at max_aspect 3
    assert pano["aspect"] == pytest.approx(3.0)

    # a stored latent is a direct VAE encode of the same resized image, to fp16 rounding
    vae = LatentVAE.from_pretrained(str(vae_dir))
    spec = TransformSpec(max_aspect=3.0)
    for name in ("rgb.jpg", "rotated.jpg", "deep16.png"):
        case = next(c for c in selected if c.name == name)
        pixels = resize_for_resolution(decode_image(case.data, max_pixels=MAX_PIXELS), LARGE, spec)
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        mean, std = vae.encode(image)
        stored = torch.from_numpy(decode_latent(rows[name]).astype(np.float32))
        fp16 = dict(atol=1e-4, rtol=2e-3)  # one fp16 step (2^-10 relative) of rounding, either way
        torch.testing.assert_close(stored, mean[0], **fp16)
        stored_std = torch.from_numpy(decode_latent(rows[name], "latent_std").astype(np.float32))
        torch.testing.assert_close(stored_std, std[0], **fp16)

    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["resolutions"] == RES
    assert manifest["rows"] == {str(SMALL): 13, str(LARGE): 12} and manifest["errors"] == 5
    assert manifest["latent_std"] == [2.0, 1.5, 1.0, 0.5] and manifest["transform"]["max_aspect"] == 3.0


def test_s3_input_and_output_via_ray_job_submit(ray_cluster, s3_server, vae_dir, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    s3.create_bucket(Bucket="hdm-images")
    s3.create_bucket(Bucket="hdm-latents")
    selected = [c for c in cases() if c.name in ("rgb.jpg", "small.png", "empty.jpg", "cmyk.jpg")]
    for case in write_folder(tmp_path / "images", selected):
        s3.upload_file(str(tmp_path / "images" / case.name), "hdm-images", f"set1/{case.name}")
        if case.caption:
            s3.put_object(Bucket="hdm-images", Key=f"set1/{Path(case.name).with_suffix('.txt')}",
                          Body=case.caption.encode())
    options = S3Options(endpoint_url=s3_server["HDM_S3_ENDPOINT"])
    upload(vae_dir, "s3://hdm-latents/models/vae", options)  # the VAE on object storage too, as a DAG's vae stage
    env = {k: v for k, v in s3_server.items() if k.startswith("AWS_")}
    result = ray_job_submit(ray_cluster, job_args("s3://hdm-images/set1", "s3://hdm-latents/run1",
                                                  "s3://hdm-latents/models/vae",
                                                  "--s3-endpoint", s3_server["HDM_S3_ENDPOINT"]), env_vars=env)
    assert result.returncode == 0, result.output[-4000:]
    fs = s3_filesystem(options)
    ok = {res: {c.name for c in selected if c.expected[res] is None} for res in RES}
    got = check_counts(fs, "hdm-latents/run1", ok, len(selected))
    assert got[SMALL]["rgb.jpg"]["caption"] == "a gradient, jpeg"
    with fs.open_input_stream("hdm-latents/run1/manifest.json") as f:
        manifest = json.loads(f.read())
    assert manifest["rows"] == {str(SMALL): 3, str(LARGE): 2}
    # the driver read the copy's config and hashed its weights; the encoders loaded their own copies
    assert manifest["vae"] == "s3://hdm-latents/models/vae"
    assert manifest["vae_weights_sha256"] == vae_weights_digest(str(vae_dir)) is not None
    assert manifest["latent_std"] == [2.0, 1.5, 1.0, 0.5]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_images(tmp_path):
    """A loopback HTTP server over a folder of the good cases, and a URL list with one 404."""
    served = tmp_path / "served"
    good = [c for c in cases() if c.name in ("rgb.jpg", "rgba.png", "gray.png", "rotated.jpg")]
    write_folder(served, good)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = [{"url": f"{base}/{c.name}", "caption": c.caption or f"caption of {c.name}"} for c in good]
    urls.append({"url": f"{base}/missing.jpg", "caption": "never downloaded"})
    pq.write_table(pa.Table.from_pylist(urls), tmp_path / "urls.parquet")
    yield tmp_path / "urls.parquet", good
    server.shutdown()


def _img2dataset(url_list: Path, output: Path, output_format: str) -> None:
    code = ("import sys; from img2dataset import download; "
            f"download(url_list={str(url_list)!r}, input_format='parquet', url_col='url', caption_col='caption', "
            f"output_folder={str(output)!r}, output_format={output_format!r}, image_size=256, resize_mode='no', "
            "processes_count=1, thread_count=4, encode_format='png', encode_quality=9, timeout=5, retries=0, "
            "disable_all_reencoding=True, enable_wandb=False, distributor='multiprocessing')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300,
                   env={**__import__("os").environ, "NO_ALBUMENTATIONS_UPDATE": "1"})


@pytest.mark.parametrize("output_format", ["parquet", "webdataset"])
def test_img2dataset_output_as_input(ray_driver, vae_dir, http_images, tmp_path, output_format):
    url_list, good = http_images
    shards = tmp_path / "shards"
    _img2dataset(url_list, shards, output_format)
    (shards / ("broken.tar" if output_format == "webdataset" else "broken.parquet")).write_bytes(b"\x00garbage" * 50)
    summary = run_in_process(input=str(shards), output=str(tmp_path / "latents"), resolutions=RES, vae=str(vae_dir),
                             max_pixels=MAX_PIXELS, batch_size=4)
    assert summary.rows == {SMALL: len(good), LARGE: len(good)}
    assert summary.errors == {"failed_to_download": 1, "unreadable_shard": 1}
    fs = pafs.LocalFileSystem()
    errors = read_parts(fs, str(tmp_path / "latents" / "errors"))
    by_reason = {e["reason_code"]: e for e in errors}
    assert by_reason["failed_to_download"]["source"].endswith("/missing.jpg")
    assert by_reason["failed_to_download"]["stage"] == "input"
    assert by_reason["unreadable_shard"]["source"].endswith("broken." + ("tar" if output_format == "webdataset" else "parquet"))
    rows = read_parts(fs, str(tmp_path / "latents" / f"res={SMALL}"))
    assert sorted(r["caption"] for r in rows) == sorted(c.caption or f"caption of {c.name}" for c in good)
    assert all(r["caption_source"] == "input" for r in rows)


def test_resume_writes_each_key_once(ray_driver, vae_dir, tmp_path, capsys):
    by_name = {c.name: c for c in cases()}
    first = [by_name[n] for n in ("rgb.jpg", "gray.png", "small.png")]
    all_cases = first + [by_name[n] for n in ("cmyk.jpg", "empty.jpg", "palette.png")]
    write_folder(tmp_path / "images", first)
    fields = dict(input=str(tmp_path / "images"), output=str(tmp_path / "latents"), resolutions=RES,
                  vae=str(vae_dir), max_pixels=MAX_PIXELS, batch_size=4)
    s1 = run_in_process(**fields)
    assert s1.rows == {SMALL: 3, LARGE: 2} and s1.errors == {"too_small": 1}
    assert progress_of(capsys.readouterr().out)[-1] == (3, 3)
    write_folder(tmp_path / "images", all_cases)
    s2 = run_in_process(**fields)
    assert s2.inputs_listed == 6  # files with a latent are read again (their sha256 compared), written only if new
    assert progress_of(capsys.readouterr().out)[-1] == (3, 3)  # the progress counts the 3 new files only
    assert s2.rows == {SMALL: 2, LARGE: 2} and s2.errors == {"empty_file": 1}
    assert (s2.recomputed, s2.duplicates_removed) == (0, 0)
    ok = {res: {c.name for c in all_cases if c.expected[res] is None} for res in RES}
    check_counts(pafs.LocalFileSystem(), str(tmp_path / "latents"), ok, len(all_cases))
    s3 = run_in_process(**fields)
    assert s3.inputs_listed == 5 and s3.rows == {}  # empty.jpg failed at every resolution: not read again
    assert set(progress_of(capsys.readouterr().out)) == {(0, 0)}


def test_changed_source_is_recomputed_once(ray_driver, vae_dir, tmp_path):
    """An image replaced by another picture under the same name: its stored sha256 no longer matches, so its
    latent is made again and the old row removed; the other keys are not written again."""
    by_name = {c.name: c for c in cases()}
    selected = [by_name[n] for n in ("rgb.jpg", "gray.png", "rgba.png")]
    write_folder(tmp_path / "images", selected)
    (tmp_path / "images" / ".DS_Store").write_bytes(b"finder")
    fields = dict(input=str(tmp_path / "images"), output=str(tmp_path / "latents"), resolutions=[SMALL],
                  vae=str(vae_dir), max_pixels=MAX_PIXELS, batch_size=4)
    s1 = run_in_process(**fields)
    assert s1.rows == {SMALL: 3} and s1.hidden_skipped == 1
    fs, root = pafs.LocalFileSystem(), str(tmp_path / "latents" / f"res={SMALL}")
    before = {r["key"]: r for r in read_parts(fs, root)}
    (tmp_path / "images" / "rgb.jpg").write_bytes(by_name["rotated.jpg"].data)  # another picture, same name
    s2 = run_in_process(**fields)
    assert s2.rows == {SMALL: 1} and (s2.recomputed, s2.duplicates_removed) == (1, 1)
    after = {r["key"]: r for r in read_parts(fs, root)}
    assert len(read_parts(fs, root)) == len(after) == 3  # every key once
    assert after["rgb.jpg"]["latent"] != before["rgb.jpg"]["latent"]
    assert after["rgb.jpg"]["sha256"] != before["rgb.jpg"]["sha256"]
    assert (after["rgb.jpg"]["width"], after["rgb.jpg"]["height"]) == (64, 96)  # the rotated picture's
    assert all(after[k]["latent"] == before[k]["latent"] for k in ("gray.png", "rgba.png"))
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["last_run"] == {"recomputed_source_changed": 1, "duplicates_removed": 1,
                                    "hidden_files_skipped": 1}
    assert manifest["rows"] == {str(SMALL): 3} and manifest["status"] == "complete"


def test_captioning_model_appends_to_input_captions(ray_driver, vae_dir, tmp_path):
    captioner = make_tiny_captioner(tmp_path / "captioner")
    selected = [c for c in cases() if c.name in ("rgb.jpg", "gray.png", "cmyk.jpg")]
    write_folder(tmp_path / "images", selected)
    summary = run_in_process(input=str(tmp_path / "images"), output=str(tmp_path / "latents"), resolutions=[SMALL],
                             vae=str(vae_dir), caption={"mode": "model", "model": str(captioner),
                                                        "policy": "append", "max_new_tokens": 8})
    assert summary.rows == {SMALL: 3}
    rows = {r["key"]: r for r in read_parts(pafs.LocalFileSystem(), str(tmp_path / "latents" / f"res={SMALL}"))}
    assert rows["rgb.jpg"]["caption"].startswith("a gradient, jpeg, ")
    assert rows["rgb.jpg"]["caption_source"] == "sidecar+model"
    assert rows["gray.png"]["caption"] and rows["gray.png"]["caption_source"] == "model"


def test_manifest_mismatch_is_refused(ray_cluster, ray_driver, vae_dir, tmp_path, capsys):
    write_folder(tmp_path / "images", [c for c in cases() if c.name == "rgb.jpg"])
    fields = dict(input=str(tmp_path / "images"), output=str(tmp_path / "latents"), resolutions=RES,
                  vae=str(vae_dir), max_pixels=MAX_PIXELS)
    run_in_process(**fields)
    from pipelines.data.latent_store import ManifestMismatch

    with pytest.raises(ManifestMismatch, match="max_aspect"):
        run_in_process(**{**fields, "max_aspect": 2.0})
    other_vae = make_tiny_vae(tmp_path / "other-vae", per_channel_stats=False)
    with pytest.raises(ManifestMismatch, match="vae_config_sha256"):
        run_in_process(**{**fields, "vae": str(other_vae)})
    retrained = make_tiny_vae(tmp_path / "retrained-vae")  # the same config, other weights
    with pytest.raises(ManifestMismatch, match="vae_weights_sha256"):
        run_in_process(**{**fields, "vae": str(retrained)})
    write_folder(tmp_path / "other-images", [c for c in cases() if c.name == "rgb.jpg"])
    with pytest.raises(ManifestMismatch, match="input: stored .* --allow-input-change"):
        run_in_process(**{**fields, "input": str(tmp_path / "other-images")})
    # an output made by other latent code and before the input was recorded: refused, then allowed
    path = tmp_path / "latents" / "manifest.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**{k: v for k, v in stored.items() if k != "input"}, "code_sha256": "0" * 64}))
    with pytest.raises(ManifestMismatch, match="code_sha256.*--allow-code-change"):
        run_in_process(**fields)
    run_in_process(**fields, allow_code_change=True)
    notes = capsys.readouterr().out
    assert "code_sha256 changed (allow_code_change)" in notes and "the stored manifest has no input" in notes
    resumed = json.loads(path.read_text())
    assert resumed["code_sha256"] == stored["code_sha256"] and resumed["input"] == stored["input"]
    # the command exits non-zero with the reason, and nothing was written
    result = subprocess.run([sys.executable, JOB, "--input", fields["input"], "--output", fields["output"],
                             "--res", *map(str, RES), "--vae", str(other_vae)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[3], timeout=300,
                            env={**__import__("os").environ, "RAY_ADDRESS": ray_cluster["RAY_ADDRESS"]})
    assert result.returncode == 3 and "precompute refused" in result.stderr
    assert len(list((tmp_path / "latents" / f"res={SMALL}").glob("*.parquet"))) == 1
