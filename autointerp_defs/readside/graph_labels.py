"""`autointerp label-graph GRAPH_JSON --coder …`: our explanations as the labels (`clerp`) of an attribution graph.

The graph is the JSON circuit-tracer's `create_graph_files` writes (its `frontend/graph_models.py::Model`, the
format Neuronpedia's graphs share): `metadata.scan` names the model or transcoder set (a `custom-…` scan lists
them in `transcoder_list`), and each node has `node_id`, `feature_type`, `layer` and `clerp`. A feature node
(`feature_type` "cross layer transcoder", circuit-tracer's name for every transcoder feature) has the id
`<layer>_<feature index>_<position>`. Only those nodes get a label; the others (embeddings, errors, logits)
and features we have no current explanation of are left as they are and counted.

A labelled graph is also copied under the data root (`DataRoot.graphs_dir`, a folder circuit-tracer's own
`serve(data_dir=…)` shows), with the latents it labels, so the latent page links to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from autointerp_defs.readside import reader
from autointerp_defs.readside.neuronpedia import (
    default_model_id,  # Neuronpedia's model id, which circuit-tracer's scans name (gemma-2-2b)
    layer_number,
)
from storage.atomic import atomic_path, read_json_or_empty, write_json
from storage.store import TableStore

FEATURE_NODE = "cross layer transcoder"
GRAPH_INDEX = "graph-metadata.json"  # the index of a folder of graphs, as circuit-tracer's add_graph_metadata writes


def coders_by_layer(store: TableStore, coder: str) -> dict[int, str]:
    """Layer → coder key: `coder` is one coder key (`tiny-topk/model.layers.3`, labels the features of its layer)
    or a coder name (`tiny-topk`, its coders of every layer, one per hookpoint `…layers.N…`)."""
    known = reader.list_coders(store)
    chosen = [coder] if coder in known else [k for k in known if k.split("/", 1)[0] == coder]
    if not chosen:
        raise reader.ExportInputError(
            f"No coder {coder!r} under {store.layout.root} (coders with activations: "
            f"{', '.join(known) or 'none'}). Fix: pass a coder key, or a coder name for its coders of every layer."
        )
    layers: dict[int, str] = {}
    for key in chosen:
        try:
            layer = layer_number(key.split("/", 1)[1])
        except reader.ExportInputError:
            raise reader.ExportInputError(
                f"Cannot tell the layer of coder {key!r}: a graph's features are named by layer. "
                "Fix: label with coders whose hookpoints name their layer (model.layers.N)."
            ) from None
        if layer in layers:
            raise reader.ExportInputError(
                f"Coders {layers[layer]!r} and {key!r} both read layer {layer}. Fix: pass one coder key."
            )
        layers[layer] = key
    return layers


def read_graph(path: Path) -> dict:
    """The graph JSON, checked to be one: a readable error names what is missing."""
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise reader.ExportInputError(f"No file {path}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError, IsADirectoryError) as error:
        raise reader.ExportInputError(f"{path} is not a graph JSON ({error}).") from None
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    metadata = graph.get("metadata") if isinstance(graph, dict) else None
    if (
        not isinstance(metadata, dict)
        or not isinstance(metadata.get("scan"), str)
        or not isinstance(nodes, list)
        or not all(
            isinstance(n, dict) and {"node_id", "feature_type", "layer"} <= n.keys() for n in nodes
        )
    ):
        raise reader.ExportInputError(
            f"{path} is not an attribution graph JSON: it needs metadata.scan and nodes with node_id, "
            "feature_type and layer. Fix: pass the <slug>.json circuit-tracer's create_graph_files wrote."
        )
    return graph


def check_model(graph: dict, path: Path, coder: str, subject_model: str | None) -> None:
    """The graph's scan (or transcoder list) must name the subject model's Neuronpedia id or the coders' name."""
    metadata = graph["metadata"]
    names = [metadata["scan"], *(metadata.get("transcoder_list") or [])]
    wanted = {default_model_id(subject_model), coder.split("/", 1)[0].lower()}
    if not any(w in str(name).lower() for name in names for w in wanted):
        raise reader.ExportInputError(
            f"{path} is a graph of {', '.join(map(str, names))!r}, not of {coder}'s subject model "
            f"{default_model_id(subject_model)!r}. Fix: label it with coders of that model (--deployment naming it)."
        )


def current_labels(store: TableStore, coder: str) -> dict[int, str]:
    """Latent → its current explanation (status ok; the last row of a latent where a table holds several)."""
    shards = reader.shard_keys_of(reader.activations_meta(store, coder))
    rows = reader.explanations(store, coder, shards, ["latent", "explanation", "status"])
    if not len(rows):
        return {}
    ok = rows[rows["status"] == "ok"].drop_duplicates("latent", keep="last")
    return dict(zip(ok["latent"].astype(int), ok["explanation"], strict=True))


def label_graph(
    data_dir: str,
    graph_path: str,
    coder: str,
    out: str | None = None,
    subject_model: str | None = None,
) -> dict[str, int]:
    """Write the graph with each feature node's `clerp` our explanation of its (layer, index); returns the counts
    of labelled feature nodes, feature nodes without an explanation and non-feature nodes."""
    store = TableStore.at(data_dir)
    path = Path(graph_path)
    layers = coders_by_layer(store, coder)
    graph = read_graph(path)
    check_model(graph, path, coder, subject_model)
    labels = {key: current_labels(store, key) for key in layers.values()}
    counts = {"labelled": 0, "without explanation": 0, "non-feature": 0}
    record: dict[str, dict[str, list[str]]] = {}
    for node in graph["nodes"]:
        if node["feature_type"] != FEATURE_NODE:
            counts["non-feature"] += 1
            continue
        try:
            key = layers.get(int(node["layer"]))
            latent = int(str(node["node_id"]).split("_")[1])
        except (ValueError, IndexError):
            raise reader.ExportInputError(
                f"{path}: feature node {node['node_id']!r} is not named <layer>_<feature>_<position>."
            ) from None
        label = labels[key].get(latent) if key else None
        if label is None:
            counts["without explanation"] += 1
            continue
        node["clerp"] = label
        counts["labelled"] += 1
        record.setdefault(key, {}).setdefault(str(latent), []).append(node["node_id"])
    text = json.dumps(graph, indent=2, ensure_ascii=False)
    with atomic_path(Path(out) if out else path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    _record(store, graph, text, record)
    return counts


def _record(store: TableStore, graph: dict, text: str, labelled: dict) -> None:
    """A copy under `graphs_dir` named by the graph's slug, circuit-tracer's index of the folder, and the
    latents it labels."""
    layout = store.layout
    slug = (
        re.sub(r"[^\w.-]", "-", str(graph["metadata"].get("slug") or "graph")).lstrip(".")
        or "graph"
    )
    if slug in ("labels", GRAPH_INDEX.removesuffix(".json")):  # the folder's own files
        slug += "-graph"
    with atomic_path(layout.labelled_graph_path(slug)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    index_path = layout.graphs_dir / GRAPH_INDEX
    index = read_json_or_empty(index_path).get("graphs", [])
    metadata = {**graph["metadata"], "slug": slug}
    write_json(index_path, {"graphs": [*(g for g in index if g.get("slug") != slug), metadata]})
    labels = read_json_or_empty(layout.graph_labels_path)
    write_json(layout.graph_labels_path, {**labels, slug: labelled})


def graphs_labelling(store: TableStore, coder: str, latent: int) -> list[dict]:
    """The labelled graphs whose features of `latent` carry its label: their slug and node ids."""
    labels = read_json_or_empty(store.layout.graph_labels_path)
    return [
        {"slug": slug, "nodes": coders[coder][str(latent)]}
        for slug, coders in sorted(labels.items())
        if str(latent) in coders.get(coder, {})
    ]


def labelled_graph(store: TableStore, slug: str) -> bytes | None:
    """A recorded graph's JSON; None for a slug not recorded (so a name from a URL never leads outside the root)."""
    if slug not in read_json_or_empty(store.layout.graph_labels_path):
        return None
    return store.layout.labelled_graph_path(slug).read_bytes()
