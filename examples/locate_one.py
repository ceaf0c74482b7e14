"""Geolocate one image with the public API and print the answer and how it was reached.

python examples/locate_one.py [IMAGE] [--bundle artifacts/demo]
"""

import argparse
from pathlib import Path

from clue2geo_sdk import Geolocator

HERE = Path(__file__).parent

parser = argparse.ArgumentParser()
parser.add_argument("image", nargs="?", default=HERE / "images" / "kauai.png")
parser.add_argument("--bundle", default="artifacts/demo")
args = parser.parse_args()

with Geolocator.load(args.bundle) as geo:
    pred = geo.locate(args.image)

print(f"{pred.image}: {pred.lat:.4f}, {pred.lon:.4f}  {pred.city}, {pred.country}  confidence {pred.confidence:.3f}")
print(f"chosen from {len(pred.candidates)} candidates ({pred.invalid_candidates} invalid answers dropped):")
for c in pred.candidates:
    print(f"  {c.source:<16} ({c.lat:9.4f}, {c.lon:9.4f})  score {c.score:+.3f}")
print("seconds per stage:", pred.timings)
