"""Results as CASE/UCO JSON-LD (https://caseontology.org), the exchange format of digital forensics tools.

``clue2geo export run.jsonl --to case.jsonld`` writes one ``case-investigation:InvestigativeAction``
per run (the records made under one identity: bundle, options, gallery, SDK version), whose
``instrument`` is a ``uco-tool:ConfiguredTool`` (clue2geo, its SDK version, a configuration holding the
bundle digest, options digest, gallery digest, demo flag and the options themselves), whose ``object``\\ s
are the input files (``uco-observable:File`` with a SHA256 ``types:Hash`` in a ContentDataFacet, and a
SHA3-512 one when the record holds it: ``locate --hash sha3-512``) and whose ``result``\\ s are the
``uco-location:Location``\\ s of each located image: the winner (rank 1) and its ranked alternatives
(the record's answers of rank 2 and on), each named "rank N of M", with a LatLongCoordinatesFacet
(latitude and longitude as ``xsd:decimal``), a ConfidenceFacet (the confidence in percent, rounded) and
the exact confidence, score, source and image in its description. Each Location is tied to its File by
a ``uco-core:Relationship`` (directional, source the File, target the Location, kindOfRelationship
:data:`RELATIONSHIP`, an open string in CASE 1.5.0), whose description says the rank: the results are
investigative leads, ranked, not findings. Failed images are objects without a result.
Identifiers are UUID v5 of what they name, so exporting the same records again gives the same graph.
Checked against CASE 1.5.0 with ``case_validate`` (the tests). Written with ``json``; all or nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from .._version import __version__
from ..files import atomic_write
from ..runs.records import IDENTITY_FIELDS, Record, is_finite_number
from ..sanitize import clean_text

KB = "http://example.org/kb/"  # CASE's conventional knowledge-base prefix for the graph's own nodes
RELATIONSHIP = "Estimated_Depicted_Location"  # File -> Location: where clue2geo estimates the photo shows
NAMESPACE = uuid.UUID("6c1e6f43-8d0b-5a52-9a43-6b1c2e0a9f10")  # clue2geo's UUID v5 namespace
CONTEXT: dict[str, str] = {
    "kb": KB,
    "case-investigation": "https://ontology.caseontology.org/case/investigation/",
    "uco-action": "https://ontology.unifiedcyberontology.org/uco/action/",
    "uco-configuration": "https://ontology.unifiedcyberontology.org/uco/configuration/",
    "uco-core": "https://ontology.unifiedcyberontology.org/uco/core/",
    "uco-location": "https://ontology.unifiedcyberontology.org/uco/location/",
    "uco-observable": "https://ontology.unifiedcyberontology.org/uco/observable/",
    "uco-tool": "https://ontology.unifiedcyberontology.org/uco/tool/",
    "uco-types": "https://ontology.unifiedcyberontology.org/uco/types/",
    "xsd": "http://www.w3.org/2001/XMLSchema#",
}


def node_id(kind: str, *parts: Any) -> str:
    """A stable IRI for a node of ``kind`` named by ``parts`` (UUID v5: same records, same graph)."""
    return f"kb:{kind}-{uuid.uuid5(NAMESPACE, json.dumps([kind, *map(str, parts)]))}"


def typed(value: Any, datatype: str) -> dict[str, str]:
    return {"@type": datatype, "@value": str(value)}


def decimal(value: float) -> dict[str, str]:
    """``value`` as an ``xsd:decimal`` literal (plain digits: never an exponent, which xsd:decimal forbids)."""
    return typed(format(Decimal(repr(float(value))), "f"), "xsd:decimal")


def _text(value: Any) -> str:
    return clean_text(value, 1000) or ""


def run_key(rec: Record) -> tuple[Any, ...]:
    """What groups records into one run (one InvestigativeAction): the identity that made them."""
    return tuple(rec.identity[k] for k in IDENTITY_FIELDS)


def tool_nodes(rec: Record) -> list[dict[str, Any]]:
    """The ConfiguredTool of a run and its Configuration (identity fields, then each option)."""
    key = run_key(rec)
    entries = [(k, json.dumps(rec.identity[k])) for k in IDENTITY_FIELDS]
    options = rec.options if isinstance(rec.options, Mapping) else {}
    entries += [(f"option.{k}", json.dumps(v, sort_keys=True)) for k, v in options.items()]
    config = {
        "@id": node_id("Configuration", *key),
        "@type": "uco-configuration:Configuration",
        "uco-configuration:configurationEntry": [
            {
                "@id": node_id("ConfigurationEntry", *key, name),
                "@type": "uco-configuration:ConfigurationEntry",
                "uco-configuration:itemName": _text(name),
                "uco-configuration:itemValue": value,
            }
            for name, value in entries
        ],
    }
    tool = {
        "@id": node_id("ConfiguredTool", *key),
        "@type": "uco-tool:ConfiguredTool",
        "uco-core:name": "clue2geo",
        "uco-tool:toolType": "photo geolocation",
        "uco-tool:version": _text(rec.sdk_version) or __version__,
        "uco-configuration:usesConfiguration": {"@id": config["@id"]},
    }
    return [tool, config]


def hash_nodes(rec: Record) -> list[dict[str, Any]]:
    """The input's recorded digests as ``types:Hash`` nodes: its SHA256, then its SHA3-512 when recorded."""
    sha = rec.image_sha256 if isinstance(rec.image_sha256, str) else None
    sha3 = rec.image_sha3_512 if isinstance(rec.image_sha3_512, str) else None
    out = []
    for method, value in (("SHA256", sha), ("SHA3-512", sha3)):
        if value:
            out.append(
                {
                    "@id": node_id("Hash", value) if method == "SHA256" else node_id("Hash", method, value),
                    "@type": "uco-types:Hash",
                    "uco-types:hashMethod": method,  # plain: the shapes compare it to plain literals
                    "uco-types:hashValue": typed(value, "xsd:hexBinary"),
                }
            )
    return out


def file_node(rec: Record) -> dict[str, Any]:
    """The input image as an observable File: its name and, when recorded, its SHA256 (and SHA3-512)."""
    sha = rec.image_sha256 if isinstance(rec.image_sha256, str) else None
    ident = node_id("File", sha or "", rec.abs_path or rec.path or "")
    facets: list[dict[str, Any]] = [
        {
            "@id": node_id("FileFacet", ident),
            "@type": "uco-observable:FileFacet",
            "uco-observable:fileName": _text(Path(str(rec.image or rec.path or "")).name),
            "uco-observable:filePath": _text(rec.abs_path or rec.image or rec.path),
        }
    ]
    if hashes := hash_nodes(rec):
        facets.append(
            {
                "@id": node_id("ContentDataFacet", ident),
                "@type": "uco-observable:ContentDataFacet",
                "uco-observable:hash": hashes,
            }
        )
    return {"@id": ident, "@type": "uco-observable:File", "uco-core:hasFacet": facets}


def _location_facets(ident: str, lat: float, lon: float, conf: float | None) -> list[dict[str, Any]]:
    """A Location's coordinates and, when known, its confidence (percent, rounded)."""
    facets: list[dict[str, Any]] = [
        {
            "@id": node_id("LatLongCoordinatesFacet", ident),
            "@type": "uco-location:LatLongCoordinatesFacet",
            "uco-location:latitude": decimal(lat),
            "uco-location:longitude": decimal(lon),
        }
    ]
    if conf is not None:
        facets.append(
            {
                "@id": node_id("ConfidenceFacet", ident),
                "@type": "uco-core:ConfidenceFacet",
                "uco-core:confidence": typed(min(100, max(0, round(conf * 100))), "xsd:nonNegativeInteger"),
            }
        )
    return facets


def _number(value: Any, spec: str = ".6f") -> str:
    return format(value, spec) if is_finite_number(value) else "unknown"


def _of(rec: Record) -> str:
    return f"{_text(rec.image or rec.path)} (sha256 {_text(rec.image_sha256) or 'unrecorded'})"


def location_node(rec: Record, file_id: str, total: int = 1) -> dict[str, Any]:
    """A located record's prediction (the winner, rank 1 of ``total`` answers) as a Location: coordinates,
    confidence (percent, rounded) and what it is of."""
    ident = node_id("Location", file_id, rec.lat, rec.lon, rec.finished_utc)
    conf = rec.confidence if is_finite_number(rec.confidence) else None
    answers = rec.answers if isinstance(rec.answers, list) else ()
    first = next((a for a in answers if isinstance(a, Mapping) and a.get("rank") == 1), {})
    demo = " DEMO bundle: meaningless (random models)." if rec.demo else ""
    desc = (
        f"clue2geo prediction (answer rank 1 of {total}, score {_number(first.get('score'))}) for {_of(rec)}: "
        f"confidence {_number(conf)}, source {_text(rec.source) or 'unknown'}. An investigative lead.{demo}"
    )
    return {
        "@id": ident,
        "@type": "uco-location:Location",
        "uco-core:name": f"rank 1 of {total}",
        "uco-core:description": desc,
        "uco-core:hasFacet": _location_facets(ident, rec.lat, rec.lon, conf),
    }


def alternative_node(rec: Record, file_id: str, answer: Mapping[str, Any], total: int) -> dict[str, Any]:
    """One of the record's ranked alternatives (an answer of rank 2 and on) as a Location."""
    rank = int(answer["rank"])
    ident = node_id("Location", file_id, rank, answer["lat"], answer["lon"], rec.finished_utc)
    conf = answer.get("confidence") if is_finite_number(answer.get("confidence")) else None
    sources = ", ".join(_text(x) for x in answer.get("sources") or () if isinstance(x, str)) or "unknown"
    demo = " DEMO bundle: meaningless (random models)." if rec.demo else ""
    desc = (
        f"clue2geo alternative (answer rank {rank} of {total}, score {_number(answer.get('score'))}) for "
        f"{_of(rec)}: confidence {_number(conf)}, sources {sources}. A lower-ranked lead than rank 1.{demo}"
    )
    return {
        "@id": ident,
        "@type": "uco-location:Location",
        "uco-core:name": f"rank {rank} of {total}",
        "uco-core:description": desc,
        "uco-core:hasFacet": _location_facets(ident, float(answer["lat"]), float(answer["lon"]), conf),
    }


def relationship_node(file_id: str, location: Mapping[str, Any]) -> dict[str, Any]:
    """The tie from an input File to one of its Locations (:data:`RELATIONSHIP`), with the rank in words."""
    return {
        "@id": node_id("Relationship", file_id, location["@id"]),
        "@type": "uco-core:Relationship",
        "uco-core:source": [{"@id": file_id}],
        "uco-core:target": {"@id": location["@id"]},
        "uco-core:isDirectional": True,
        "uco-core:kindOfRelationship": RELATIONSHIP,
        "uco-core:description": f"estimated location of what the image shows, answer {location['uco-core:name']}",
    }


def result_nodes(rec: Record, file_id: str) -> list[dict[str, Any]]:
    """A located record's Locations, best first: its prediction, then its ranked alternatives."""
    alts = rec.alternatives()
    total = 1 + len(alts)
    return [location_node(rec, file_id, total), *(alternative_node(rec, file_id, a, total) for a in alts)]


def located(rec: Record) -> bool:
    """Whether a record is a result: "ok" with a finite latitude and longitude."""
    return rec.ok and is_finite_number(rec.lat) and is_finite_number(rec.lon)


def _times(recs: Sequence[Record]) -> dict[str, Any]:
    starts = sorted(r.started_utc for r in recs if isinstance(r.started_utc, str))
    ends = sorted(r.finished_utc for r in recs if isinstance(r.finished_utc, str))
    out = {}
    if starts:
        out["uco-action:startTime"] = typed(starts[0], "xsd:dateTime")
    if ends:
        out["uco-action:endTime"] = typed(ends[-1], "xsd:dateTime")
    return out


def action_nodes(recs: Sequence[Record]) -> list[dict[str, Any]]:
    """One run (records of one identity) as an InvestigativeAction and the nodes it names."""
    tool, config = tool_nodes(recs[0])
    files = [file_node(r) for r in recs]
    per_file = [(f["@id"], result_nodes(r, f["@id"])) for r, f in zip(recs, files, strict=True) if located(r)]
    locations = [loc for _, locs in per_file for loc in locs]
    relationships = [relationship_node(fid, loc) for fid, locs in per_file for loc in locs]
    failed = len(recs) - len(per_file)
    action = {
        "@id": node_id("InvestigativeAction", *run_key(recs[0]), *(f["@id"] for f in files)),
        "@type": "case-investigation:InvestigativeAction",
        "uco-core:name": "clue2geo photo geolocation",
        "uco-core:description": (
            f"{len(recs)} image(s): {len(per_file)} located, {failed} not located (no result); "
            f"{len(locations) - len(per_file)} ranked alternative location(s) besides the predictions"
        ),
        **_times(recs),
        "uco-action:instrument": {"@id": tool["@id"]},
        "uco-action:object": [{"@id": f["@id"]} for f in files],
        "uco-action:result": [{"@id": loc["@id"]} for loc in locations],
    }
    return [action, tool, config, *files, *locations, *relationships]


def case_graph(records: Sequence[Record]) -> dict[str, Any]:
    """The JSON-LD document of ``records`` (latest per image): one InvestigativeAction per run."""
    runs: dict[tuple[Any, ...], list[Record]] = {}
    for rec in records:
        runs.setdefault(run_key(rec), []).append(rec)
    graph = [node for recs in runs.values() for node in action_nodes(recs)]
    return {"@context": CONTEXT, "@graph": graph}


def write_case(dest: Path, records: Sequence[Record]) -> None:
    """Write ``records`` as CASE/UCO JSON-LD (all or nothing)."""
    atomic_write(dest, json.dumps(case_graph(records), indent=2, ensure_ascii=False) + "\n")
