rule concept_map:
    """The concept map's layout of one SAE: every concept a point (UMAP of its decoder direction, cosine) and its
    k-means cluster, seeded. It reads the SAE alone, so it runs beside the evaluations as soon as the SAE is
    trained, and a new benchmark or new labels rerun the explorer but not this."""
    input:
        sae_weights=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/sae_weights.safetensors",
    output:
        layout=f"{RESULTS}/concept_map/model={{model}}/layer={{layer}}/concept_map.parquet",
    params:
        spec=lambda wc: spec_json(config, "concept_map"),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/concept_map/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/concept_map/model={{model}}/layer={{layer}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "NUMBA_NUM_THREADS={threads} python -m competency_gaps concept-map --model {wildcards.model} --layer {wildcards.layer} "
        "--spec {params.spec:q} --sae-weights {input.sae_weights} --out {output.layout} 2> {log}"


rule explorer:
    """The interactive explorer of one (model, layer): a self-contained static site (index.html, app.js, data/)
    that opens from disk or any static host, with no server and no internet. Model/benchmark gaps toggle, concept
    table, concept detail with highlighted contexts and examples, concept map (concept_map's layout, clusters named),
    correlation and overlap heatmaps, item view; the URL keeps the state. A leaf: nothing reads it, so it is a
    directory() output that Snakemake replaces whole."""
    input:
        concepts=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/concepts.parquet",
        concept_benchmark=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/concept_benchmark.parquet",
        benchmarks=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/benchmarks.parquet",
        thresholds=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/thresholds.json",
        labels=f"{RESULTS}/labels/model={{model}}/layer={{layer}}/labels.parquet",
        contexts=f"{RESULTS}/labels/model={{model}}/layer={{layer}}/contexts.parquet",
        sae_summary=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/summary.json",
        layout=f"{RESULTS}/concept_map/model={{model}}/layer={{layer}}/concept_map.parquet",
        item_tables=expand(f"{RESULTS}/benchmarks/benchmark={{benchmark}}/items.parquet", benchmark=BENCHMARKS),
        scores=expand(
            f"{RESULTS}/evaluate/model={{model}}/benchmark={{benchmark}}/scores.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        saliency=expand(
            f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/saliency.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
    output:
        # Not in `snakemake --report report.html`: a single-file report cannot hold a folder. Open it from disk.
        site=directory(f"{RESULTS}/explorer/model={{model}}/layer={{layer}}"),
    params:
        spec=lambda wc: spec_json(config, "explorer"),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/explorer/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/explorer/model={{model}}/layer={{layer}}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "python -m competency_gaps explorer --model {wildcards.model} --layer {wildcards.layer} "
        "--spec {params.spec:q} --concepts {input.concepts} --labels {input.labels} "
        "--sae-summary {input.sae_summary} --concept-map {input.layout} --items {input.item_tables} "
        "--scores {input.scores} --saliency {input.saliency} --out-dir {output.site} 2> {log}"


rule explorer_index:
    """results/explorer/index.html links to the explorer of every configured (model, layer), and sites.js gives each
    explorer the links to the others (so adding a model rewrites these two files, not every explorer)."""
    input:
        sites=[f"{RESULTS}/explorer/model={model}/layer={layer}" for model in MODELS for layer in layers_of(model)],
    output:
        index=f"{RESULTS}/explorer/index.html",
        sites=f"{RESULTS}/explorer/sites.js",
    params:
        sites=lambda wc: json.dumps(explorer_sites()),
        out_dir=lambda wc, output: os.path.dirname(output.index),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/explorer/index.log",
    localrule: True
    shell:
        "python -m competency_gaps explorer-index --sites {params.sites:q} --out-dir {params.out_dir} 2> {log}"
