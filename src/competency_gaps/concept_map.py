"""Stage: the concept map's layout. Every concept of an SAE is a point: a 2-D UMAP of its decoder direction
(cosine metric), with k-means clusters of the points, both seeded. The layout depends on the SAE alone, so a new
benchmark or new labels rerun the explorer but not this stage. That matters because UMAP takes tens of seconds
(most of it numba compiling). The explorer outlines the clusters and names them from the labels
(`explorer_data.concept_map`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from competency_gaps.tables import CONCEPT_MAP, write_parquet

log = logging.getLogger(__name__)


def decoder_directions(sae_dir: str | Path) -> np.ndarray:
    """The SAE's decoder directions (K × d_in) straight from its safetensors file (no sae-lens import)."""
    from safetensors.numpy import load_file

    weights = load_file(str(Path(sae_dir) / "sae_weights.safetensors"))
    if "W_dec" not in weights:
        raise ValueError(f"{sae_dir}/sae_weights.safetensors has no W_dec (keys: {sorted(weights)})")
    return weights["W_dec"].astype(np.float32)


def project_directions(directions_KD: np.ndarray, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    """2-D UMAP (cosine metric) of the concepts' decoder directions; PCA when there are too few concepts for
    a neighbour graph. Seeded, so the map is the same on every run."""
    directions = np.asarray(directions_KD, dtype=np.float32)
    if directions.shape[0] < 8:
        centred = directions - directions.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        out = centred @ vt[:2].T
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    import umap

    n_neighbors = min(n_neighbors, directions.shape[0] - 1)
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine",
                        random_state=seed, n_jobs=1, precomputed_knn=exact_neighbours(directions, n_neighbors))
    return reducer.fit_transform(directions)


EXACT_NEIGHBOURS_MAX = 16384  # concepts up to which the neighbour graph is computed exactly (brute force)


def exact_neighbours(directions_KD: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray, None] | tuple[None, None, None]:
    """UMAP's `precomputed_knn` for up to EXACT_NEIGHBOURS_MAX concepts: each concept's nearest directions by
    cosine distance (itself first), by brute force. Measured at 4,608 concepts on 2 CPU cores: 13 s for the whole
    map against 48 s with UMAP's own approximate search, most of which is compiling it (numba). The cost grows
    with the square of the concepts (16,384 × 16,384 × d_model multiply-adds at the limit: seconds); above it,
    UMAP searches itself."""
    if directions_KD.shape[0] > EXACT_NEIGHBOURS_MAX:
        return None, None, None
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=n_neighbors, metric="cosine", algorithm="brute").fit(
        directions_KD).kneighbors(directions_KD)
    return indices, distances.astype(np.float32), None


def cluster_points(xy_K2: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """k-means clusters of the map's points (seeded)."""
    from sklearn.cluster import KMeans

    n_clusters = max(1, min(n_clusters, xy_K2.shape[0]))
    return KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit_predict(xy_K2).astype(np.int64)


def map_layout(directions_KD: np.ndarray, spec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(K, 2) points and (K,) clusters of the concepts: the UMAP and k-means of `spec` (the explorer's settings:
    umap_neighbors, umap_min_dist, clusters, max_clusters, seed)."""
    seed = int(spec.get("seed", 0))
    xy = project_directions(directions_KD, int(spec.get("umap_neighbors", 15)), float(spec.get("umap_min_dist", 0.1)), seed)
    n_clusters = spec.get("clusters") or max(2, round(math.sqrt(directions_KD.shape[0] / 8)))
    return xy, cluster_points(xy, int(min(n_clusters, spec.get("max_clusters", 60))), seed)


def run_concept_map(sae_dir: str | Path, spec: Mapping[str, Any], out: str | Path) -> None:
    """Write the layout of the SAE in `sae_dir` to `out` (concept, x, y, cluster)."""
    directions = decoder_directions(sae_dir)
    xy, cluster = map_layout(directions, spec)
    table = pa.table({"concept": np.arange(directions.shape[0], dtype=np.int32), "x": xy[:, 0].astype(np.float32),
                      "y": xy[:, 1].astype(np.float32), "cluster": cluster.astype(np.int32)})
    write_parquet(table, out, CONCEPT_MAP)
    log.info("concept map: %d concepts in %d clusters", directions.shape[0], len(np.unique(cluster)))
