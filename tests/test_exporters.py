"""Every exporter reproduces its reference on the same inputs (and says so with a typed error when not)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch  # the tests install the [export] extra

from clue2geo_sdk import Bundle, ExportValidationError


def test_check_close_raises_typed_error() -> None:
    from exporters._validate import check_close

    assert check_close("x", np.zeros(3), np.full(3, 1e-6), atol=1e-5) == pytest.approx(1e-6)
    with pytest.raises(ExportValidationError, match="exceeds tolerance"):
        check_close("x", np.zeros(3), np.full(3, 1e-3), atol=1e-5)
    with pytest.raises(ExportValidationError, match="shape"):
        check_close("x", np.zeros(3), np.zeros(4), atol=1.0)


def test_manifest_records_parity_within_tolerance(demo_bundle: Path) -> None:
    b = Bundle.open(demo_bundle, verify=False)
    gps = b.component("gpsclip").provenance["parity"]
    assert gps["location_vs_geoclip_max_abs_diff"] <= gps["atol"]
    assert b.component("sbert").provenance["parity"]["max_abs_diff"] <= 1e-5
    clip = b.component("clip").provenance["parity"]
    assert clip["image_max_abs_diff"] <= clip["atol"] and clip["text_max_abs_diff"] <= clip["atol"]


def test_location_onnx_matches_geoclip_module(demo_bundle: Path) -> None:
    """Runtime encoder (onnxruntime) vs GeoCLIP's own torch LocationEncoder with its released weights."""
    from clue2geo_sdk.engines.encoders import GpsClipEncoder
    from exporters.gpsclip import geoclip_reference, sample_coordinates

    b = Bundle.open(demo_bundle, verify=False)
    enc = GpsClipEncoder(
        {k: b.file("gpsclip", k) for k in ("image", "location")}, b.params("gpsclip"), ["CPUExecutionProvider"]
    )
    coords = sample_coordinates(200, seed=7)
    ref = geoclip_reference(coords)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    got = enc.encode_locations(coords)
    # float32 sin/cos of the sigma=256 capsule's large phases differ in the last bits between engines
    assert np.max(np.abs(ref - got)) < 1e-3
    assert np.min(np.sum(ref * got, axis=1)) > 0.99999


def test_projections_against_hand_values() -> None:
    from exporters.gpsclip import project

    pts = torch.tensor([[0.0, 0.0], [0.0, 180.0], [45.0, 90.0]])
    merc = project(pts, "mercator").numpy()
    assert merc[0] == pytest.approx([0.0, 0.0], abs=1e-7)
    assert merc[1, 0] == pytest.approx(1.0)
    assert merc[2, 1] == pytest.approx(math.log(math.tan(math.pi / 4 + math.radians(45) / 2)) / math.pi, rel=1e-6)
    ee = project(pts, "equal_earth").numpy()
    # Equal Earth at the equator: x = 2*sqrt(3)*lon / (3*A1) (theta=0), scaled by SF/180.
    assert ee[1, 0] == pytest.approx(2 * math.sqrt(3) * math.pi / (3 * 1.340264) * 66.50336 / 180, rel=1e-6)
    with pytest.raises(ValueError, match="unknown projection"):
        project(pts, "gnomonic")


def test_clip_export_parity_and_tokenizer(tmp_path: Path) -> None:
    from open_clip.tokenizer import tokenize
    from tokenizers import Tokenizer

    from exporters.clip_onnx import SAMPLE_TEXTS, export_clip, tiny_open_clip

    res = export_clip(tiny_open_clip(seed=3), tmp_path, seed=3)
    assert res["parity"]["image_max_abs_diff"] < 1e-4 and res["parity"]["text_max_abs_diff"] < 1e-4
    tok = Tokenizer.from_file(str(res["files"]["tokenizer"]))
    texts = [*SAMPLE_TEXTS, "Straßenschild: Hauptbahnhof 3 km", "snow & ice, -5°C"]
    ids = np.array([e.ids for e in tok.encode_batch(texts)])
    assert np.array_equal(ids, tokenize(texts).numpy())


def test_sbert_onnx_matches_sentence_transformers(demo_bundle: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from clue2geo_sdk.engines.encoders import SbertEncoder
    from exporters.sbert_onnx import minilm_dir

    b = Bundle.open(demo_bundle, verify=False)
    enc = SbertEncoder(
        {k: b.file("sbert", k) for k in ("model", "tokenizer")}, b.params("sbert"), ["CPUExecutionProvider"]
    )
    texts = ["Red pillars on a temple", "A yellow taxi in Manhattan", "Overcast sky over a pine forest, light rain"]
    ref = SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.max(np.abs(enc.encode(texts) - ref)) < 1e-5


def test_gallery_index_holds_location_embeddings(demo_bundle: Path) -> None:
    import duckdb

    from clue2geo_sdk._native import usearch_index
    from clue2geo_sdk.engines.encoders import GpsClipEncoder

    b = Bundle.open(demo_bundle, verify=False)
    idx = usearch_index().Index.restore(str(b.file("gallery", "index")), view=True)
    assert len(idx) == 100_000 and idx.ndim == 512
    keys = np.array([0, 1, 4242, 99_999], dtype=np.uint64)
    with duckdb.connect(str(b.file("metadata", "db")), read_only=True) as con:
        rows = con.execute("SELECT lat, lon FROM gallery WHERE key IN (0, 1, 4242, 99999) ORDER BY key").fetchall()
        n_cities = con.execute("SELECT count(*) FROM cities").fetchone()[0]
    assert n_cities > 100_000
    enc = GpsClipEncoder(
        {k: b.file("gpsclip", k) for k in ("image", "location")}, b.params("gpsclip"), ["CPUExecutionProvider"]
    )
    want = enc.encode_locations(np.array(rows))
    got = np.asarray(idx.get(keys), dtype=np.float32)
    got /= np.linalg.norm(got, axis=1, keepdims=True)
    assert np.max(np.abs(got - want)) < 2e-3  # stored as f16
    # the first GeoCLIP gallery row is in Patagonia (AR)
    with duckdb.connect(str(b.file("metadata", "db")), read_only=True) as con:
        assert con.execute("SELECT country_code FROM gallery WHERE key = 0").fetchone()[0] == "AR"


def test_vlm_gguf_pair_loads_and_answers_under_schema(demo_bundle: Path) -> None:
    from exporters.vlm_gguf import check_gguf_pair

    b = Bundle.open(demo_bundle, verify=False)
    res = check_gguf_pair(b.file("vlm", "model"), b.file("vlm", "mmproj"))
    assert isinstance(res["answer"]["country"], str)
    assert res["prompt_tokens"] > 10  # the image's tokens are in the prompt


def test_qwen_tokenizer_ids_match_qwen25() -> None:
    from exporters.qwen_vl import FIRST_ADDED_ID, QWEN25_ADDED_TOKENS, build_qwen_tokenizer

    tok = build_qwen_tokenizer()
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert len(tok) == FIRST_ADDED_ID + len(QWEN25_ADDED_TOKENS)
    # Qwen2 splits digits one by one and round-trips text exactly.
    ids = tok.encode("Coordinates 48.8584, 2.2945", add_special_tokens=False)
    assert tok.decode(ids) == "Coordinates 48.8584, 2.2945"
    assert sum(1 for t in tok.convert_ids_to_tokens(ids) if t.isdigit()) == 11
