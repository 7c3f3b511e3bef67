"""End to end on tiny models: train for seconds, build a bundle, serve it, evaluate it."""

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oodserve.config import Settings
from oodserve.models.build.fusion_choice import MIN_VALIDATION_FOR_CHOICE, choice_reason, choose_fusion
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.evaluation.run import EvalSettings, evaluate
from oodserve.models.fit.fashion_mnist import BuildSettings, build_bundle
from oodserve.models.flows.train import TrainSettings as FlowSettings
from oodserve.models.flows.train import train_flow
from oodserve.models.sngp.train import TrainSettings as SNGPSettings
from oodserve.models.sngp.train import train
from oodserve.server.app import create_app

pytestmark = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(), reason="Debian dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch


    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("tiny-models")
    common = dict(family="glow", preset="tiny", epochs=1, batch_size=32, limit_train=256, limit_test=64, threads=1)
    train_flow(FlowSettings(out=str(work / "flow"), **common))
    train_flow(FlowSettings(out=str(work / "background"), mutation_rate=0.2, weight_decay=1e-4, seed=1, **common))
    train(SNGPSettings(out_dir=str(work / "sngp"), epochs=1, batch_size=32, limit_train=256, threads=1,
                       model={"widths": [4, 8, 8], "num_random_features": 64}))
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(BuildSettings(
        out=str(out), flow_checkpoint=str(work / "flow" / "best.pt"),
        background_checkpoint=str(work / "background" / "best.pt"), sngp_checkpoint=str(work / "sngp" / "model.pt"),
        limit=120, reference_size=200, threads=1,
    ))
    return out


def test_bundle_is_complete_and_calibrated_on_unseen_data(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert set(manifest["models"]) == {"flow", "background", "sngp"}
    assert manifest["sampler"]["file"] == "flow_sample.onnx"
    assert "bits_per_dim" not in manifest["fusion"]["signals"]
    assert manifest["fusion"]["reason"]
    with np.load(tiny_bundle / "calibration.npz", allow_pickle=False) as calibration:
        assert set(calibration.files) == {s["name"] for s in manifest["signals"]} | {"__fused__"}
        assert all(calibration[name].size == 120 for name in calibration.files)


def test_served_bundle_scores_samples_and_tests_batches(tiny_bundle: Path) -> None:

    images = load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[:3]
    with TestClient(create_app(Settings(bundle=tiny_bundle, warmup_batch_size=2, intra_op_threads=1, inter_op_threads=1))) as client:
        response = client.post("/v1/score", json={"instances": images.tolist()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["results"]) == 3 and body["batch"]["size"] == 3
        assert set(body["results"][0]["signals"]) >= {"typicality", "likelihood_ratio", "input_complexity", "feature_density"}
        sample = client.post("/v1/models/fashion-mnist/sample", json={"n": 4, "temperature": 0.7, "seed": 0})
        assert sample.status_code == 200 and sample.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_report(tiny_bundle: Path, tmp_path: Path) -> None:

    report = evaluate(EvalSettings(bundle=str(tiny_bundle), in_dist=str(DEFAULT_FASHION_MNIST_DIR),
                                   ood={"mnist": str(Path(__file__).parents[3].parent / "shared/data/mnist")}
                                   if (Path(__file__).parents[3].parent / "shared/data/mnist").exists() else {},
                                   out=str(tmp_path / "report"), limit=60, threads=1))
    text = report.read_text()
    assert "score (fused)" in text and "| 0.05 |" in text and "Accuracy" in text
    assert (tmp_path / "report" / "histograms.png").stat().st_size > 1000
    assert (tmp_path / "report" / "roc_inverted.png").exists()
    assert (tmp_path / "report" / "samples_t0.7.png").read_bytes()[:4] == b"\x89PNG"


def test_rebuild_keeps_the_reused_flows_and_retrains_only_sngp(tiny_bundle: Path, tmp_path: Path) -> None:
    import torch


    torch.set_num_threads(1)
    train(SNGPSettings(out_dir=str(tmp_path / "sngp"), epochs=1, batch_size=32, limit_train=128, threads=1, seed=3,
                       model={"widths": [4, 8, 8], "num_random_features": 64}))
    out = tmp_path / "rebuilt"
    build_bundle(BuildSettings(out=str(out), reuse_from=str(tiny_bundle), reuse=("flow", "background"),
                               sngp_checkpoint=str(tmp_path / "sngp" / "model.pt"), limit=120, reference_size=200, threads=1))
    for name in ("flow.onnx", "flow_sample.onnx", "background.onnx"):
        assert (out / name).read_bytes() == (tiny_bundle / name).read_bytes()
    assert (out / "sngp.onnx").read_bytes() != (tiny_bundle / "sngp.onnx").read_bytes()
    before = json.loads((tiny_bundle / "manifest.json").read_text())["provenance"]["training"]
    after = json.loads((out / "manifest.json").read_text())["provenance"]["training"]
    assert list(after) == ["flow", "background", "sngp"]
    assert after["flow"]["steps"] == before["flow"]["steps"] and "reused_from" in after["flow"]
    assert "reused_from" not in after["sngp"]
    with pytest.raises(ValueError, match="reuse"):
        build_bundle(BuildSettings(out=str(tmp_path / "bad"), reuse=("flow",)))
    with pytest.raises(ValueError, match="seed"):  # models trained on another split may have seen this calibration
        build_bundle(BuildSettings(out=str(tmp_path / "bad"), reuse_from=str(tiny_bundle), reuse=("flow", "background"),
                                   sngp_checkpoint=str(tmp_path / "sngp" / "model.pt"), seed=5, limit=120, reference_size=200, threads=1))


def test_fusion_choice_prefers_the_informative_signal() -> None:
    rng = np.random.default_rng(0)
    inside = {"good": rng.uniform(size=500), "noise": rng.uniform(size=500)}
    outside = {"shift": {"good": rng.uniform(size=500) ** 8, "noise": rng.uniform(size=500)},
               "other": {"good": rng.uniform(size=500) ** 4, "noise": rng.uniform(size=500)}}
    best, ranked = choose_fusion(["good", "noise"], inside, outside)
    assert best.signals == ("good",)
    assert len(ranked) == 4  # two singletons (one method each) + the pair under fisher and min_p


def test_too_few_held_out_rows_fall_back_to_fisher_over_every_signal() -> None:

    rng = np.random.default_rng(0)
    count = MIN_VALIDATION_FOR_CHOICE // 4
    inside = {"good": rng.uniform(size=count), "noise": rng.uniform(size=count)}
    outside = {"shift": {"good": rng.uniform(size=count) ** 8, "noise": rng.uniform(size=count)}}
    best, ranked = choose_fusion(["good", "noise"], inside, outside)
    assert (best.method, best.signals) == ("fisher", ("good", "noise")) and len(ranked) == 4
    assert "too few" in choice_reason(best, ranked, ["good", "noise"], count, "rows")
