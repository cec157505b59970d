"""The one ``detections.json`` schema, written by the prediction scripts and read by the metric scripts.

Schema (version 1)::

    {
      "schema": "segmamba-detections",
      "schema_version": 1,
      "box_format": "z1,y1,x1,z2,y2,x2",
      "box_units": "voxel indices of the original (uncropped) raw volume, half-open: z1 <= z < z2 ...",
      "axis_order": "zyx",                    # array axes; SimpleITK's x is the last array axis
      "source": {...},                        # free-form provenance (model path, thresholds, script)
      "cases": {
        "ABUS_000": {
          "image_shape_zyx": [Z, Y, X],       # raw volume shape
          "spacing_zyx": [sz, sy, sx],        # mm, raw volume spacing in array-axis order
          "boxes": [[z1, y1, x1, z2, y2, x2], ...],
          "scores": [s0, s1, ...]             # same length as boxes, sorted descending
        }, ...
      }
    }

Case keys are the case names (``ABUS_<id>``), each at most once. A case present with no boxes means "predicted,
nothing found". The reader refuses a file whose boxes are inverted (``z2 < z1`` ...), negative or outside the
stated image shape, or whose boxes or scores are not finite numbers.
"""
from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

SCHEMA_NAME = "segmamba-detections"
SCHEMA_VERSION = 1
BOX_FORMAT = "z1,y1,x1,z2,y2,x2"
BOX_UNITS = ("voxel indices of the original (uncropped) raw volume, half-open: a box covers "
             "z1 <= z < z2, y1 <= y < y2, x1 <= x < x2 (array axes z, y, x = SimpleITK z, y, x)")


class DetectionsFileError(ValueError):
    """A detections.json that does not follow the schema (message names the file and the problem)."""


@dataclass
class CasePrediction:
    """Predicted boxes of one case (file box format, original-volume voxel coordinates)."""
    boxes: np.ndarray  # (P, 6) float
    scores: np.ndarray  # (P,) float, descending
    image_shape_zyx: Optional[Sequence[int]] = None
    spacing_zyx: Optional[Sequence[float]] = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 6)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if self.boxes.shape[0] != self.scores.shape[0]:
            raise ValueError(f"{self.boxes.shape[0]} boxes but {self.scores.shape[0]} scores")
        order = np.argsort(-self.scores, kind="stable")
        self.boxes, self.scores = self.boxes[order], self.scores[order]


def write_detections_json(path: str | os.PathLike, cases: Mapping[str, CasePrediction],
                          source: Optional[Dict[str, object]] = None) -> None:
    """Write ``cases`` (case name → prediction) atomically in the schema above."""
    from light_training.utils.files import save_json_atomic

    payload = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "box_format": BOX_FORMAT,
               "box_units": BOX_UNITS, "axis_order": "zyx", "source": dict(source or {}), "cases": {}}
    for name in sorted(cases):
        case = cases[name]
        payload["cases"][name] = {
            "image_shape_zyx": None if case.image_shape_zyx is None else [int(v) for v in case.image_shape_zyx],
            "spacing_zyx": None if case.spacing_zyx is None else [float(v) for v in case.spacing_zyx],
            "boxes": [[round(float(v), 3) for v in box] for box in case.boxes],
            "scores": [float(s) for s in case.scores],
        }
    save_json_atomic(payload, path)


def read_detections_json(path: str | os.PathLike) -> Dict[str, CasePrediction]:
    """Read and validate a detections.json → case name → :class:`CasePrediction`.

    Raises:
        FileNotFoundError, DetectionsFileError: with the path and what is wrong.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: detections file not found (run the prediction script first)")
    def refuse_repeated_keys(pairs):
        repeated = sorted(key for key, count in collections.Counter(key for key, _ in pairs).items() if count > 1)
        if repeated:  # json.load would silently keep the last entry of each
            raise DetectionsFileError(f"{path}: {repeated[:5]} listed more than once in one object; each case "
                                      "(and each field) may appear only once")
        return dict(pairs)

    try:
        with open(path, "r", encoding="utf-8") as handle:
            payload = json.load(handle, object_pairs_hook=refuse_repeated_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DetectionsFileError(f"{path}: not valid JSON, e.g. a truncated file ({error})") from error
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_NAME:
        raise DetectionsFileError(
            f"{path}: not a '{SCHEMA_NAME}' file (expected a JSON object with \"schema\": \"{SCHEMA_NAME}\"; "
            "files of the reference repository's list or dict layouts are not accepted)")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise DetectionsFileError(f"{path}: schema_version {payload.get('schema_version')!r} is not supported "
                                  f"(this code reads version {SCHEMA_VERSION})")
    if payload.get("box_format") != BOX_FORMAT:
        raise DetectionsFileError(f"{path}: box_format {payload.get('box_format')!r}, expected {BOX_FORMAT!r}")
    cases_in = payload.get("cases")
    if not isinstance(cases_in, dict):
        raise DetectionsFileError(f"{path}: 'cases' must be an object mapping case names to predictions")
    cases: Dict[str, CasePrediction] = {}
    for name, entry in cases_in.items():
        try:
            boxes = np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 6) if entry["boxes"] else \
                np.zeros((0, 6))
            scores = np.asarray(entry["scores"], dtype=np.float64).reshape(-1)
            if boxes.shape[0] != scores.shape[0]:
                raise ValueError(f"{boxes.shape[0]} boxes but {scores.shape[0]} scores")
            if not (np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores))):
                raise ValueError("non-finite box coordinate or score")
            inverted = np.flatnonzero(np.any(boxes[:, 3:] < boxes[:, :3], axis=1))
            if inverted.size:
                raise ValueError(f"box {int(inverted[0])} {boxes[inverted[0]].tolist()} is inverted (needs "
                                 f"z1 <= z2, y1 <= y2, x1 <= x2)")
            if boxes.size and boxes.min() < 0:
                raise ValueError(f"negative box coordinate {float(boxes.min())} (boxes are voxel indices >= 0)")
            shape = entry.get("image_shape_zyx")
            if shape is not None and boxes.size:
                limit = np.asarray(shape, dtype=np.float64).reshape(3)
                outside = np.flatnonzero(np.any(boxes[:, 3:] > limit + 1e-3, axis=1))
                if outside.size:
                    raise ValueError(f"box {int(outside[0])} {boxes[outside[0]].tolist()} reaches outside the image "
                                     f"shape {list(shape)}")
            cases[name] = CasePrediction(boxes, scores, entry.get("image_shape_zyx"), entry.get("spacing_zyx"))
        except (KeyError, TypeError, ValueError) as error:
            raise DetectionsFileError(f"{path}: case {name!r}: invalid entry ({error})") from error
    return cases
