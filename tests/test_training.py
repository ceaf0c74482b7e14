"""Training end to end on a tiny random Qwen2.5-VL: dataset builder -> 3 LoRA stages -> bundle -> locate;
and the fidelity points: reasoning chains for the true location, reviewed chains replacing them,
over-long examples skipped, the inference image-token budget, and which tokens carry labels."""

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
from clue2geo_sdk.pipeline.prompts import CITY_REASON, LOCATE, LOCATE_REASON  # noqa: E402

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
save_every = 2
"""
LONG = 3  # p3's RC chain is longer than max_length: skipped in RC, reported, the stage completes


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
            json.dumps(
                {
                    "path": f"p{i}.jpg",
                    "rc": "long " * 1200 if i == LONG else f"city reason {i}",
                    "rl": f"landmark reason {i}",
                }
            )
            + "\n"
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
            "--reason-tokens",
            "128",
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
    # reasons are counted per chain (RC and RL each)
    assert summary["sources"] == {"cues": {"teacher": 1, "file": N - 1}, "reasons": {"teacher": 2, "file": 2 * (N - 1)}}
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
def base(workdir: Path) -> Path:
    from exporters.qwen_vl import build_tiny_qwen25vl

    return build_tiny_qwen25vl(workdir / "base", seed=1)


@pytest.fixture(scope="module")
def trained(dataset: Path, workdir: Path, base: Path) -> Path:
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
    with pytest.raises(ValueError, match="another base model, config or image budget"):
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
    # inference shows the trained model images at the budget it was trained with
    assert b.params("vlm")["image_max_tokens"] == summary["image_max_tokens"]
    with Geolocator.load(out, device="cpu", max_cue_tokens=32, max_answer_tokens=32) as geo:
        pred = geo.locate(workdir / "imgs" / "p0.jpg")
    assert -90 <= pred.lat <= 90 and pred.bundle == "tiny-trained"


# -- fidelity: reasoning chains, reviewed chains, over-long examples, image budget, labels ------------


def _small_set(root: Path, rows: list[tuple[str, str, str, str]]) -> tuple[Path, Path]:
    """Images and a CSV (path, lat, lon, country, city, landmark) plus a cues file, so the teacher
    is asked only for reasoning chains."""
    imgs = root / "imgs"
    for i, (rel, *_) in enumerate(rows):
        (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (96, 64), (40 * i, 120, 200)).save(imgs / rel)
    with open(root / "photos.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "lat", "lon", "country", "city", "landmark"])
        w.writerows([rel, 48.8584, 2.2945, country, city, landmark] for rel, country, city, landmark in rows)
    cue = {"cue": "Tower", "description": "an iron lattice tower"}
    (root / "cues.jsonl").write_text("".join(json.dumps({"path": r[0], "cues": [cue]}) + "\n" for r in rows))
    return root / "photos.csv", imgs


class _Teacher:
    """Records the prompts the dataset builder asks the teacher and answers with a fixed chain."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    def __call__(self, image: object, prompt: str, *, max_tokens: int | None = None) -> str:
        self.prompts.append(prompt)
        self.max_tokens = max_tokens
        return self.answer


def _answers(out: Path, stage: str) -> dict[str, tuple[dict, dict]]:
    recs = _read(out / f"{stage}.train.jsonl")
    root = out.parent / "imgs"
    return {
        Path(r["image"]).relative_to(root.resolve()).as_posix(): (json.loads(r["messages"][1]["content"]), r["meta"])
        for r in recs
    }


def test_teacher_explains_the_true_location(geo: Geolocator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.dataset import REASON_MAX_TOKENS, build_dataset

    csv_path, imgs = _small_set(tmp_path, [("eiffel.jpg", "France", "Paris", "Eiffel Tower")])
    teacher = _Teacher("  The French street sign\n reads 'Quai Branly'.\x07 ")
    monkeypatch.setattr(geo, "ask", teacher)
    out = tmp_path / "data"
    build_dataset(csv_path, imgs, geo, out, cues_jsonl=tmp_path / "cues.jsonl", val_percent=0)
    rc_prompt, rl_prompt = teacher.prompts
    assert teacher.max_tokens == REASON_MAX_TOKENS > geo.options.max_answer_tokens  # room for a chain
    assert "Paris, France" in rc_prompt
    assert "Eiffel Tower, Paris, France" in rl_prompt and "48.858400" in rl_prompt and "2.294500" in rl_prompt
    assert "iron lattice tower" in rl_prompt  # the cluemap the chain must reason over
    chain = "The French street sign reads 'Quai Branly'."  # control characters gone, whitespace collapsed
    for stage in ("rc", "rl"):
        answer, meta = _answers(out, stage)["eiffel.jpg"]
        assert answer["Reasons"] == chain and meta["reasons_source"] == "teacher"
    (review,) = _read(out / "reasons.jsonl")
    assert review == {"path": "eiffel.jpg", "rc": chain, "rl": chain, "source": {"rc": "teacher", "rl": "teacher"}}


def test_reasons_file_replaces_teacher_chains(geo: Geolocator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.dataset import build_dataset

    rows = [("a/x.jpg", "France", "Paris", ""), ("b/x.jpg", "Italy", "Rome", ""), ("c.jpg", "Japan", "Kyoto", "")]
    csv_path, imgs = _small_set(tmp_path, rows)
    # keyed by relative path: the two x.jpg are different photos; b gives only its RL chain
    given = [{"path": "a/x.jpg", "rc": "A city", "rl": "A landmark"}, {"path": "b/x.jpg", "rl": "B landmark"}]
    (tmp_path / "reasons.jsonl").write_text("".join(json.dumps(g) + "\n" for g in given))
    teacher = _Teacher("teacher chain")
    monkeypatch.setattr(geo, "ask", teacher)
    out = tmp_path / "data"
    kw = {"cues_jsonl": tmp_path / "cues.jsonl", "val_percent": 0}
    summary = build_dataset(csv_path, imgs, geo, out, reasons_jsonl=tmp_path / "reasons.jsonl", **kw)
    want = {
        ("a/x.jpg", "rc"): ("A city", "file"),
        ("a/x.jpg", "rl"): ("A landmark", "file"),
        ("b/x.jpg", "rc"): ("teacher chain", "teacher"),
        ("b/x.jpg", "rl"): ("B landmark", "file"),
        ("c.jpg", "rc"): ("teacher chain", "teacher"),
        ("c.jpg", "rl"): ("teacher chain", "teacher"),
    }
    got = {
        (rel, stage): (ans["Reasons"], meta["reasons_source"])
        for stage in ("rc", "rl")
        for rel, (ans, meta) in _answers(out, stage).items()
    }
    assert got == want and len(teacher.prompts) == 3
    assert summary["sources"]["reasons"] == {"file": 3, "teacher": 3}
    assert "Rome, Italy" in teacher.prompts[0] and "Kyoto, Japan" in teacher.prompts[1]
    # the review loop: edit the written chains, pass them back; the teacher is not asked again
    reviewed = _read(out / "reasons.jsonl")
    reviewed[2]["rl"] = "Reviewed: the torii gate and Japanese signs."
    (tmp_path / "reviewed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reviewed))
    teacher.prompts.clear()
    build_dataset(csv_path, imgs, geo, tmp_path / "again", reasons_jsonl=tmp_path / "reviewed.jsonl", **kw)
    assert teacher.prompts == []
    answer, meta = _answers(tmp_path / "again", "rl")["c.jpg"]
    assert answer["Reasons"] == "Reviewed: the torii gate and Japanese signs." and meta["reasons_source"] == "file"


def test_overlong_example_is_skipped_and_reported(trained: Path) -> None:
    run = json.loads((trained / "run.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["rc", "rl", "ol"]  # RC completed despite p3
    assert run["skipped_too_long"] == {
        "rc": {"count": 1, "images": [f"p{LONG}.jpg"]},
        "rl": {"count": 0, "images": []},
        "ol": {"count": 0, "images": []},
    }
    rc = run["stages"][0]
    assert rc["steps"] == 16 and len(rc["losses"]) == 16  # no step lost: p3 shares its batch


def _record(image: Path, answer: str) -> dict:
    return {
        "image": str(image),
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where was this taken?"}]},
            {"role": "assistant", "content": answer},
        ],
    }


def test_labels_are_exactly_the_answer_and_im_end(base: Path, dataset: Path) -> None:
    import torch

    from training.train import encode_example, image_budget, load_processor

    proc = load_processor(base, image_budget(dataset))
    rec = _read(dataset / "rl.train.jsonl")[0]
    enc = encode_example(proc, rec, max_length=4096, image_max_tokens=image_budget(dataset))
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    labelled = labels != -100
    n = int(labelled.sum())
    assert labelled[-n:].all() and not labelled[:-n].any()  # one run, at the end
    assert torch.equal(labels[labelled], ids[labelled])
    decoded = proc.tokenizer.decode(ids[labelled], skip_special_tokens=False)
    assert decoded == rec["messages"][1]["content"] + "<|im_end|>"
    assert proc.tokenizer.decode(ids[:-n]).endswith("<|im_start|>assistant\n")  # the prompt is unlabelled


def test_training_images_get_the_inference_token_budget(
    base: Path, dataset: Path, demo_bundle: Path, trained: Path, tmp_path: Path
) -> None:
    from clue2geo_sdk.engines.image_tokens import fit_image, image_tokens, smart_size
    from clue2geo_sdk.inputs.image import load_image
    from training.train import encode_example, image_budget, load_processor

    budget = Bundle.open(demo_bundle).params("vlm")["image_max_tokens"]
    assert image_budget(dataset) == budget
    assert {s["image_max_tokens"] for s in json.loads((trained / "run.json").read_text())["stages"]} == {budget}
    photo = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1333), (90, 140, 60)).save(photo)
    for tokens in (budget, 64):
        proc = load_processor(base, tokens)
        enc = encode_example(proc, _record(photo, '{"lat": "1.0"}'), max_length=8192, image_max_tokens=tokens)
        w, h = smart_size(2000, 1333, tokens)
        assert enc["image_grid_thw"][0].tolist() == [1, h // 14, w // 14]
        pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert int((enc["input_ids"][0] == pad).sum()) == image_tokens(w, h) <= tokens
        # the processor does not resize again: its pixels are those of fit_image's output as is
        fitted = fit_image(load_image(photo).image, tokens)
        direct = proc.image_processor(images=[fitted], do_resize=False, return_tensors="pt")["pixel_values"]
        assert enc["pixel_values"].shape == direct.shape and bool((enc["pixel_values"] == direct).all())


def test_shipped_configs_take_a_phone_photo(
    geo: Geolocator, base: Path, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shipped stage config (training/configs/*.toml) fits the longest example the dataset builder
    writes for a 4032x3024 phone photo at the inference image budget: 12 cues at the cue schema's
    maxima and a teacher chain of REASON_MAX_TOKENS tokens (the RC config's 1024 did not even hold
    the image and the chain; RL's 2048 did not hold the cluemap and the chain)."""
    from clue2geo_sdk.engines.ask import CUES_SCHEMA
    from clue2geo_sdk.engines.image_tokens import image_tokens, smart_size
    from training.config import StageConfig
    from training.dataset import REASON_MAX_TOKENS, build_dataset
    from training.train import encode_example, image_budget, load_processor

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    y, x = np.mgrid[0:3024, 0:4032]
    arr = np.stack([x * 255 // 4032, y * 255 // 3024, (x + y) * 255 // 7056], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(imgs / "phone.jpg", quality=90)
    with open(tmp_path / "photos.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "lat", "lon"], ["phone.jpg", 53.7381, -0.3309]])
    props = CUES_SCHEMA["items"]["properties"]
    long_cue, long_desc = props["cue"]["maxLength"], props["description"]["maxLength"]
    cues = [
        {"cue": f"Cue {i:02d} " + "brick facade " * 10, "description": f"Detail {i:02d} " + "weathered sign " * 30}
        for i in range(CUES_SCHEMA["maxItems"])
    ]
    cues = [{"cue": c["cue"][:long_cue], "description": c["description"][:long_desc]} for c in cues]
    (tmp_path / "cues.jsonl").write_text(json.dumps({"path": "phone.jpg", "cues": cues}) + "\n")
    budget = Bundle.open(demo_bundle).params("vlm")["image_max_tokens"]
    proc = load_processor(base, budget)
    words = "The red brick facade, the white window frames and the bilingual street sign point to this district. "
    chain = proc.tokenizer.decode(proc.tokenizer(words * 40)["input_ids"][:REASON_MAX_TOKENS])
    assert len(proc.tokenizer(chain)["input_ids"]) >= REASON_MAX_TOKENS - 2  # the teacher's longest chain
    monkeypatch.setattr(geo, "ask", lambda image, prompt, *, max_tokens=None: chain)
    out = tmp_path / "data"
    build_dataset(tmp_path / "photos.csv", imgs, geo, out, cues_jsonl=tmp_path / "cues.jsonl", val_percent=0)
    assert image_budget(out) == budget == 1024  # one budget: the bundle's, for training and inference
    n_ctx = Bundle.open(demo_bundle).params("vlm")["n_ctx"]
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    w, h = smart_size(4032, 3024, budget)
    for stage in ("rc", "rl", "ol"):
        cfg = StageConfig.load(Path(__file__).resolve().parents[1] / "training" / "configs" / f"{stage}.toml")
        assert cfg.stage == stage and cfg.max_length <= n_ctx  # never longer than inference's context
        rec = _read(out / f"{stage}.train.jsonl")[0]
        prompt = rec["messages"][0]["content"][1]["text"]
        assert stage == "rc" or prompt.count("weathered sign") >= 12 * 5  # every cue, whole, in the cluemap
        enc = encode_example(proc, rec, max_length=cfg.max_length, image_max_tokens=budget)  # not TooLongError
        ids = enc["input_ids"][0]
        assert int((ids == pad).sum()) == image_tokens(w, h) == 972
        print(f"{stage}: {ids.shape[0]} tokens of max_length {cfg.max_length}")
