"""Training end to end on a tiny random Qwen2.5-VL: dataset builder -> 3 LoRA stages -> bundle -> locate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytestmark = pytest.mark.slow

from clue2geo_sdk import Bundle, Geolocator  # noqa: E402
from clue2geo_sdk.cli import main  # noqa: E402
from clue2geo_sdk.prompts import CITY_REASON, LOCATE, LOCATE_REASON  # noqa: E402

N = 8
STAGE_TOML = """stage = "{stage}"
rank = 8
alpha = 16
dropout = 0.0
lr = 5e-3
epochs = {epochs}
batch = 2
grad_accum = 1
max_length = 1024
max_pixels = 6144
save_every = 2
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N):
        color = rng.integers(0, 255, 3)
        arr = np.clip(color + rng.normal(0, 20, (64, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "imgs" / f"p{i}.jpg")
        rows.append(
            [
                f"p{i}.jpg",
                round(float(rng.uniform(-60, 60)), 5),
                round(float(rng.uniform(-170, 170)), 5),
                "Testland" if i % 2 == 0 else "",
                "Eiffel Tower" if i == 0 else "",
            ]
        )
    with open(root / "photos.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "lat", "lon", "country", "landmark"])
        w.writerows(rows)
        w.writerow(["missing.jpg", 1, 1, "", ""])
        w.writerow(["p1.jpg", 95, 1, "", ""])
        w.writerow(["p2.jpg", "abc", 1, "", ""])
    (root / "imgs" / "broken.jpg").write_text("not a jpeg")
    with open(root / "photos.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["broken.jpg", 10, 10, "", ""])
    # precomputed cues and reasons for all but the last image, which goes to the teacher
    (root / "cues.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "path": f"p{i}.jpg",
                    "cues": [
                        {"cue": "Sign", "description": f"street sign number {i}"},
                        {"cue": "Tree", "description": "a palm tree"},
                        {"cue": "Sky", "description": "clear blue sky"},
                        {"cue": "Road", "description": "asphalt road"},
                    ],
                }
            )
            + "\n"
            for i in range(N - 1)
        )
    )
    (root / "reasons.jsonl").write_text(
        "".join(
            json.dumps({"path": f"p{i}.jpg", "rc": f"city reason {i}", "rl": f"landmark reason {i}"}) + "\n"
            for i in range(N - 1)
        )
    )
    for stage in ("rc", "rl", "ol"):
        (root / f"{stage}.toml").write_text(STAGE_TOML.format(stage=stage, epochs=4))
    return root


@pytest.fixture(scope="module")
def dataset(workdir: Path, demo_bundle: Path) -> Path:
    out = workdir / "data"
    res = CliRunner().invoke(
        main,
        [
            "train",
            "dataset",
            "--csv",
            str(workdir / "photos.csv"),
            "--images",
            str(workdir / "imgs"),
            "--bundle",
            str(demo_bundle),
            "--out",
            str(out),
            "--cues",
            str(workdir / "cues.jsonl"),
            "--reasons",
            str(workdir / "reasons.jsonl"),
            "--val-percent",
            "0",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataset_files_follow_the_templates(dataset: Path, workdir: Path) -> None:
    summary = json.loads((dataset / "summary.json").read_text())
    assert summary["skipped"] == {"missing_file": 1, "bad_coordinates": 2, "unreadable_image": 1}
    assert summary["sources"] == {"cues": {"teacher": 1, "file": N - 1}, "reasons": {"teacher": 1, "file": N - 1}}
    truth: dict[str, dict] = {}
    for r in csv.DictReader((workdir / "photos.csv").open()):
        truth.setdefault(r["path"], r)  # later rows for p1/p2 are the bad ones
    rc, rl, ol = (_read(dataset / f"{s}.train.jsonl") for s in ("rc", "rl", "ol"))
    assert len(rc) == len(rl) == len(ol) == N
    for a, b, c in zip(rc, rl, ol, strict=True):
        name = Path(a["image"]).name
        t = truth[name]
        ans_rc, ans_rl, ans_ol = (json.loads(x["messages"][1]["content"]) for x in (a, b, c))
        assert set(ans_rc) == {"country", "city", "Reasons"}
        assert set(ans_rl) == {"country", "city", "landmark", "lat", "lon", "Reasons"}
        assert set(ans_ol) == {"country", "city", "landmark", "lat", "lon"}
        assert ans_ol["lat"] == f"{float(t['lat']):.6f}" and ans_ol["lon"] == f"{float(t['lon']):.6f}"
        assert (
            ans_ol["country"] == (t["country"] or ans_ol["country"]) and ans_ol["country"]
        )  # filled offline if absent
        assert ans_ol["landmark"] == (t["landmark"] or None)
        assert ans_rc["country"] == ans_ol["country"] and ans_rc["city"] == ans_ol["city"]
        prompt = lambda rec: rec["messages"][0]["content"][1]["text"]  # noqa: E731
        assert prompt(a) == CITY_REASON.format()
        cm = prompt(c).split("Input clues in order of importance:\n")[1].split("\nOutput only JSON")[0]
        assert prompt(c) == LOCATE.format(cluemap=cm) and prompt(b) == LOCATE_REASON.format(cluemap=cm)
        if b["meta"]["reasons_source"] == "file":
            assert ans_rl["Reasons"] == f"landmark reason {name[1:-4]}" and "Clue Set 1:" in cm
            assert a["meta"]["country_source"] == ("csv" if t["country"] else "reverse_geocoder")


@pytest.fixture(scope="module")
def trained(dataset: Path, workdir: Path) -> Path:
    from exporters.qwen_vl import build_tiny_qwen25vl

    base = build_tiny_qwen25vl(workdir / "base", seed=1)
    out = workdir / "run"
    args = [
        "train",
        "run",
        *sum((["--config", str(workdir / f"{s}.toml")] for s in ("rc", "rl", "ol")), []),
        "--base",
        str(base),
        "--data",
        str(dataset),
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return out


def test_each_stage_trains_and_loss_falls(trained: Path) -> None:
    run = json.loads((trained / "run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["rc", "rl", "ol"]
    for s in run["stages"]:
        per_epoch = len(s["losses"]) // 4
        first, last = np.mean(s["losses"][:per_epoch]), np.mean(s["losses"][-per_epoch:])
        assert last < first, (s["stage"], s["losses"])
    state = json.loads((trained / "ol" / "checkpoint" / "state.json").read_text())
    assert state["config"]["stage"] == "ol" and state["step"] == run["stages"][2]["steps"]
    assert state["base"].endswith("rl/merged")  # each stage starts from the previous merged model
    assert len(state["base_digest"]) == 64


def test_interrupted_stage_resumes(dataset: Path, workdir: Path, trained: Path) -> None:
    from training.config import StageConfig
    from training.train import train_stage

    cfg = StageConfig.load(workdir / "ol.toml")
    base = trained / "rl" / "merged"
    out = workdir / "resume"
    first = train_stage(cfg, base, dataset, out, max_steps=3)
    assert first["steps"] == 3
    again = train_stage(cfg, base, dataset, out)
    assert again["steps"] == 16 and again["losses"][:3] == first["losses"][:3]
    other = StageConfig.load(workdir / "rl.toml")
    with pytest.raises(ValueError, match="another base model or config"):
        train_stage(attrs_evolve(other, stage="ol"), base, dataset, out)


def attrs_evolve(cfg, **kw):  # noqa: ANN001, ANN003, ANN201
    import attrs

    return attrs.evolve(cfg, **{**kw, "lr": cfg.lr * 2})


def test_skipping_a_stage(dataset: Path, workdir: Path, trained: Path) -> None:
    from training.config import StageConfig
    from training.train import run_stages

    cfgs = [StageConfig.load(workdir / f"{s}.toml") for s in ("rc", "rl", "ol")]
    res = run_stages(cfgs, trained / "rc" / "merged", dataset, workdir / "skip", skip=("rc", "rl"), max_steps=1)
    assert [s["stage"] for s in res["stages"]] == ["ol"] and res["skipped"] == ["rc", "rl"]


def test_trained_model_becomes_a_bundle_that_locates(
    trained: Path, dataset: Path, demo_bundle: Path, workdir: Path
) -> None:
    out = workdir / "bundle"
    res = CliRunner().invoke(
        main,
        [
            "train",
            "export",
            "--model",
            str(trained / "final"),
            "--out",
            str(out),
            "--name",
            "tiny-trained",
            "--from-bundle",
            str(demo_bundle),
            "--data",
            str(dataset),
        ],
    )
    assert res.exit_code == 0, res.output
    b = Bundle.open(out, verify=True)
    assert b.name == "tiny-trained" and not b.component("vlm").random_weights
    summary = json.loads((dataset / "summary.json").read_text())
    assert b.params("vlm")["prompts"]["locate"] == summary["templates"]["locate"]
    with Geolocator.load(out, device="cpu", max_cue_tokens=32, max_answer_tokens=32) as geo:
        pred = geo.locate(workdir / "imgs" / "p0.jpg")
    assert -90 <= pred.lat <= 90 and pred.bundle == "tiny-trained"
