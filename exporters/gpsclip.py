"""GPSCLIP: a GPS-aligned CLIP as in GeoCLIP / G3, in torch, exported to two ONNX towers.

Location tower: map projection -> random Fourier features at sigma 2^0, 2^4, 2^8 -> one MLP
"capsule" per sigma -> summed 512-d vector. Its parameter names follow GeoCLIP's release, so
``location_encoder_weights.pth`` from the ``geoclip`` package loads as is.
Image tower: a Hugging Face CLIP vision model with a 768-d projection + GeoCLIP's image MLP (768->512).
"""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from ._onnx import EXTERNAL_DATA_ABOVE, export_module, fp16_variants, onnx_files, run_onnx
from ._validate import check_close

SIGMAS = (2.0**0, 2.0**4, 2.0**8)
PROJECTIONS = ("equal_earth", "mercator")
# Equal Earth constants (Šavrič et al. 2018), with GeoCLIP's scale factor.
_A1, _A2, _A3, _A4, _SF = 1.340264, -0.081106, 0.000893, 0.003796, 66.50336
_MERCATOR_MAX_LAT = 85.05112878


def geoclip_weights_dir() -> Path:
    return Path(str(files("geoclip").joinpath("model/weights")))


def geoclip_gallery_csv() -> Path:
    return Path(str(files("geoclip").joinpath("model/gps_gallery/coordinates_100K.csv")))


def project(latlon: torch.Tensor, projection: str) -> torch.Tensor:
    """(N, 2) degrees (lat, lon) -> (N, 2) planar coordinates, roughly in [-1, 1]."""
    lat, lon = latlon[:, 0] * (math.pi / 180), latlon[:, 1] * (math.pi / 180)
    if projection == "equal_earth":
        theta = torch.asin(math.sqrt(3.0) / 2 * torch.sin(lat))
        denom = 3 * (9 * _A4 * theta**8 + 7 * _A3 * theta**6 + 3 * _A2 * theta**2 + _A1)
        x = 2 * math.sqrt(3.0) * lon * torch.cos(theta) / denom
        y = _A4 * theta**9 + _A3 * theta**7 + _A2 * theta**3 + _A1 * theta
        return torch.stack((x, y), dim=1) * _SF / 180
    if projection == "mercator":
        lat = torch.clamp(lat, -math.radians(_MERCATOR_MAX_LAT), math.radians(_MERCATOR_MAX_LAT))
        y = torch.log(torch.tan(math.pi / 4 + lat / 2))
        return torch.stack((lon / math.pi, y / math.pi), dim=1)
    raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")


class FourierFeatures(nn.Module):
    """gamma(v) = [cos(2 pi B v), sin(2 pi B v)] with a fixed Gaussian B of std sigma."""

    def __init__(self, sigma: float, in_dim: int = 2, n_freq: int = 256) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.randn(n_freq, in_dim) * sigma, requires_grad=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        vp = 2 * math.pi * v @ self.b.T
        return torch.cat((torch.cos(vp), torch.sin(vp)), dim=-1)


class Capsule(nn.Module):
    def __init__(self, sigma: float, dim: int = 512, hidden: int = 1024) -> None:
        super().__init__()
        self.capsule = nn.Sequential(
            FourierFeatures(sigma, n_freq=256),
            nn.Linear(512, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.capsule(x))


class LocationTower(nn.Module):
    """(N, 2) lat/lon degrees -> (N, 512) unnormalized location embedding."""

    def __init__(self, sigmas: tuple[float, ...] = SIGMAS, projection: str = "equal_earth") -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; choose one of {', '.join(PROJECTIONS)}")
        self.projection = projection
        self.sigmas = tuple(sigmas)
        for i, s in enumerate(self.sigmas):
            self.add_module(f"LocEnc{i}", Capsule(s))

    def forward(self, latlon: torch.Tensor) -> torch.Tensor:
        x = project(latlon, self.projection)
        return sum(self._modules[f"LocEnc{i}"](x) for i in range(len(self.sigmas)))

    @classmethod
    def from_geoclip(cls, projection: str = "equal_earth") -> LocationTower:
        """GeoCLIP's released location-encoder weights (shipped in the ``geoclip`` package)."""
        tower = cls(projection=projection)
        state = torch.load(
            geoclip_weights_dir() / "location_encoder_weights.pth", map_location="cpu", weights_only=True
        )
        tower.load_state_dict(state, strict=True)
        return tower.eval()


class ImageTower(nn.Module):
    """CLIP vision model with a 768-d projection, then GeoCLIP's MLP 768 -> 768 -> 512."""

    def __init__(self, clip_vision: nn.Module) -> None:
        super().__init__()
        self.clip = clip_vision
        self.mlp = nn.Sequential(nn.Linear(768, 768), nn.ReLU(), nn.Linear(768, 512))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.clip(pixel_values=pixel_values).image_embeds)

    def load_geoclip_mlp(self) -> ImageTower:
        state = torch.load(
            geoclip_weights_dir() / "image_encoder_mlp_weights.pth", map_location="cpu", weights_only=True
        )
        self.mlp.load_state_dict(state, strict=True)
        return self

    @classmethod
    def from_clip_folder(cls, path: str | Path) -> ImageTower:
        """A local Hugging Face CLIP checkpoint (e.g. clip-vit-large-patch14) + GeoCLIP's MLP."""
        from transformers import CLIPVisionModelWithProjection  # export extra, heavy: only for this tower

        vision = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
        if vision.config.projection_dim != 768:
            raise ValueError(
                f"{path}: GeoCLIP's MLP needs a 768-d CLIP projection, this one has {vision.config.projection_dim}"
            )
        return cls(vision).load_geoclip_mlp().eval()

    @classmethod
    def tiny_random(cls, seed: int = 0) -> ImageTower:
        """Demo stand-in: a small CLIP vision config of the same class, 768-d projection, real MLP."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # export extra, heavy

        torch.manual_seed(seed)
        cfg = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
            projection_dim=768,
        )
        return cls(CLIPVisionModelWithProjection(cfg)).load_geoclip_mlp().eval()


def sample_coordinates(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic test coordinates covering poles, the antimeridian and ordinary places."""
    rng = np.random.default_rng(seed)
    fixed = np.array([[0.0, 0.0], [89.9, 179.9], [-89.9, -179.9], [48.8584, 2.2945], [-33.8568, 151.2153]])
    rand = np.column_stack([rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)])
    return np.vstack([fixed, rand]).astype(np.float32)


def _gpsclip_params(location: LocationTower, dim: int, image_size: int) -> dict[str, Any]:
    """What the runtime's GPSCLIP encoder reads: the location tower's projection and Fourier scales,
    the embedding width, and the image tower's preprocessing (OpenAI CLIP's)."""
    return {
        "projection": location.projection,
        "sigmas": list(location.sigmas),
        "dim": dim,
        "image_size": image_size,
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "resize": "shortest_side_bicubic_center_crop",
    }


def export_gpsclip(
    location: LocationTower,
    image: ImageTower,
    out_dir: str | Path,
    *,
    image_size: int = 224,
    atol: float = 1e-4,
    seed: int = 0,
    fp16: bool = False,
    external_data_above: int = EXTERNAL_DATA_ABOVE,
) -> dict[str, Any]:
    """Export both towers; check them against torch, and the location tower against GeoCLIP's own module.

    With ``fp16`` a float16 image tower (``image_fp16``) is added when it passes parity. The location
    tower stays float32: its sigma = 2^8 Fourier features take sin/cos of phases in the thousands,
    which float16 cannot hold, and the gallery was embedded with the float32 tower.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    coords = torch.from_numpy(sample_coordinates(64, seed))
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref_loc = location(coords).numpy()
        ref_img = image(pixels).numpy()
    loc_path = export_module(
        location,
        (coords,),
        out_dir / "location.onnx",
        input_names=["latlon"],
        output_names=["location_embeds"],
        external_data_above=external_data_above,
    )
    img_path = export_module(
        image,
        (pixels,),
        out_dir / "image.onnx",
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        external_data_above=external_data_above,
    )
    onnx_loc = run_onnx(loc_path, {"latlon": coords.numpy()})[0]
    d_loc = check_close("GPSCLIP location tower", ref_loc, onnx_loc, atol=atol)
    img_feeds = {"pixel_values": pixels.numpy()}
    d_img = check_close("GPSCLIP image tower", ref_img, run_onnx(img_path, img_feeds)[0], atol=atol)
    parity: dict[str, Any] = {"location_max_abs_diff": d_loc, "image_max_abs_diff": d_img, "atol": atol}
    if location.projection == "equal_earth" and location.sigmas == SIGMAS:
        parity["location_vs_geoclip_max_abs_diff"] = check_close(
            "GPSCLIP location tower vs geoclip.LocationEncoder", geoclip_reference(coords.numpy()), onnx_loc, atol=atol
        )
    files: dict[str, Path] = {**onnx_files("image", img_path), **onnx_files("location", loc_path)}
    params = _gpsclip_params(location, int(ref_loc.shape[1]), image_size)
    if fp16:
        towers = {"image": (img_path, img_feeds, ref_img)}
        params["fp16"] = fp16_variants(out_dir, towers, files, external_data_above=external_data_above)
    return {"files": files, "params": params, "parity": parity}


def geoclip_reference(latlon: np.ndarray) -> np.ndarray:
    """GeoCLIP's own torch LocationEncoder with its released weights, as the independent reference."""
    from geoclip import LocationEncoder  # export extra: the independent reference, only when checked

    with torch.no_grad():
        return LocationEncoder().eval()(torch.from_numpy(np.asarray(latlon, dtype=np.float32))).numpy()
