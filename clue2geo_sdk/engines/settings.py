"""The VLM settings a bundle's manifest gives the engines (context per image, image-token budget,
temperature). ``Bundle.open`` has checked their types and ranges (bundle/parse.py), so they are read here."""

from __future__ import annotations

from ..bundle.manifest import Bundle

N_CTX_DEFAULT = 4096  # KV cells per image when the bundle does not say


def vlm_int(bundle: Bundle, key: str, default: int) -> int:
    """A whole-number VLM setting of the bundle's manifest (type and range checked by ``Bundle.open``)."""
    value = bundle.params("vlm").get(key)
    return default if value is None else int(value)


def vlm_temperature(bundle: Bundle) -> float:
    """The bundle's generation temperature (0, greedy, when it does not say; checked by ``Bundle.open``)."""
    return float(bundle.params("vlm").get("generation", {}).get("temperature", 0.0))
