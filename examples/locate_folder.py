"""Geolocate a folder with the public API; write JSONL, GeoJSON and the offline HTML case report.

python examples/locate_folder.py [FOLDER] [--bundle artifacts/demo] [--out out/]
"""

import argparse
import json
from pathlib import Path

from clue2geo_sdk import Failure, Geolocator

HERE = Path(__file__).parent

parser = argparse.ArgumentParser()
parser.add_argument("folder", nargs="?", default=HERE / "images")
parser.add_argument("--bundle", default="artifacts/demo")
parser.add_argument("--out", default="out")
args = parser.parse_args()

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
images = sorted(p for p in Path(args.folder).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
features, records = [], []
with Geolocator.load(args.bundle) as geo:
    demo = geo.bundle.demo  # random-weight parts: the report says so, and so do we
    if demo:
        print(f"warning: bundle {geo.bundle.name!r} is a demo bundle (random weights): predictions are meaningless")
    for result in geo.locate_many(images):
        if isinstance(result, Failure):
            print(f"FAILED {result.image}: {result.message}")
            records.append({"path": result.image, "status": "error", **result.to_dict(), "demo": demo})
            continue
        print(
            f"{result.image}: {result.lat:.4f}, {result.lon:.4f} ({result.city}, {result.country}) "
            f"confidence {result.confidence if result.confidence is None else round(result.confidence, 2)} "
            f"over {len(result.answers)} distinct answer(s)"
        )
        records.append({"path": result.image, "status": "ok", **result.to_dict(), "demo": demo})
        features.append(result.to_geojson())
    bundle = geo.bundle

(out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
(out / "results.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))

from clue2geo_sdk.evidence.report.render import write_report  # noqa: E402

write_report(out / "report.html", records, bundle)
print(f"wrote {out / 'results.jsonl'}, {out / 'results.geojson'}, {out / 'report.html'}")
