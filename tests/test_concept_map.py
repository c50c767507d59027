"""The concept map: its layout stage (UMAP of the decoder directions, k-means clusters) and the explorer's
clusters named from the labels."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from safetensors.numpy import save_file

from competency_gaps.cli import main
from competency_gaps.concept_map import exact_neighbours, map_layout
from competency_gaps.explorer_data import concept_map
from competency_gaps.tables import CONCEPT_MAP, check_parquet

SPEC = {"umap_neighbors": 5, "clusters": 2, "seed": 0}


def two_groups() -> np.ndarray:
    """40 directions in two tight groups along different axes."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0, 0.05, (20, 8)) + 3 * np.eye(8)[0],
                           rng.normal(0, 0.05, (20, 8)) - 3 * np.eye(8)[1]]).astype(np.float32)


def test_the_maps_neighbour_graph_is_the_exact_cosine_one(monkeypatch):
    directions = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    indices, distances, _ = exact_neighbours(directions, 5)
    unit = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    cosine_distance = 1 - unit @ unit.T
    assert (indices[:, 0] == np.arange(300)).all()  # each concept is its own nearest neighbour, as UMAP expects
    np.testing.assert_allclose(distances, np.sort(cosine_distance, axis=1)[:, :5], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(cosine_distance, indices, 1), distances, atol=1e-5)
    monkeypatch.setattr("competency_gaps.concept_map.EXACT_NEIGHBOURS_MAX", 299)
    assert exact_neighbours(directions, 5) == (None, None, None)  # above the limit UMAP searches itself


def test_the_layout_is_seeded_and_splits_the_groups():
    xy, cluster = map_layout(two_groups(), SPEC)
    again_xy, again_cluster = map_layout(two_groups(), SPEC)
    np.testing.assert_array_equal(xy, again_xy)
    np.testing.assert_array_equal(cluster, again_cluster)
    assert xy.shape == (40, 2)
    assert set(cluster[:20].tolist()).isdisjoint(cluster[20:].tolist())  # each group its own cluster


def test_the_stage_writes_the_layout_of_the_sae(tmp_path):
    save_file({"W_dec": two_groups()}, str(tmp_path / "sae_weights.safetensors"))
    out = tmp_path / "concept_map.parquet"
    spec = json.dumps({"version": 1, "config": {"explorer": SPEC}})
    main(["concept-map", "--model", "m", "--layer", "1", "--spec", spec,
          "--sae-weights", str(tmp_path / "sae_weights.safetensors"), "--out", str(out)])
    check_parquet(out, CONCEPT_MAP)
    layout = pl.read_parquet(out)
    xy, cluster = map_layout(two_groups(), SPEC)
    assert layout["concept"].to_list() == list(range(40))
    np.testing.assert_allclose(layout.select("x", "y").to_numpy(), xy, rtol=1e-6)
    assert layout["cluster"].to_list() == cluster.tolist()


def test_the_explorer_outlines_and_names_the_clusters_from_the_labels():
    xy, cluster = map_layout(two_groups(), SPEC)
    # The layout as the stage stores it, rows in another order: the explorer orders them by concept.
    layout = pl.DataFrame({"concept": np.arange(40, dtype=np.int32), "x": xy[:, 0], "y": xy[:, 1],
                           "cluster": cluster.astype(np.int32)}).reverse()
    data = concept_map(layout, ['"alpha"'] * 20 + ['"beta"'] * 20)
    assert data["cluster"] == cluster.tolist() and len(data["x"]) == 40
    assert sorted(c["name"] for c in data["clusters"]) == ["alpha", "beta"]
    assert all(len(c["hull"]) >= 3 and c["size"] == 20 for c in data["clusters"])
