# Cross-model comparison, run when the config names several models (targets: compare_targets in common.smk).
FLIPPED = f"{RESULTS}/compare/flipped/model={{model}}/layer={{layer}}/sae_of={{sae_model}}"


rule compare_models:
    """Two (model, layer)s: the concepts of their two SAEs matched by the items they fire on and ranked by how much
    their χ_model differs (cross_model.md/.csv, cross_model.png in the report, category Cross-model), and the
    benchmarks compared item by item (benchmarks.csv)."""
    input:
        saliency_a=per_benchmark(f"{RESULTS}/extract/model={{model_a}}/benchmark={{benchmark}}/layer={{layer_a}}/saliency.parquet"),
        tokens_a=per_benchmark(f"{RESULTS}/extract/model={{model_a}}/benchmark={{benchmark}}/layer={{layer_a}}/item_tokens.parquet"),
        scores_a=per_benchmark(f"{RESULTS}/evaluate/model={{model_a}}/benchmark={{benchmark}}/scores.parquet"),
        concepts_a=f"{RESULTS}/concepts/model={{model_a}}/layer={{layer_a}}/concepts.parquet",
        labels_a=f"{RESULTS}/labels/model={{model_a}}/layer={{layer_a}}/labels.parquet",
        sae_cfg_a=f"{RESULTS}/sae/model={{model_a}}/layer={{layer_a}}/cfg.json",
        saliency_b=per_benchmark(f"{RESULTS}/extract/model={{model_b}}/benchmark={{benchmark}}/layer={{layer_b}}/saliency.parquet"),
        tokens_b=per_benchmark(f"{RESULTS}/extract/model={{model_b}}/benchmark={{benchmark}}/layer={{layer_b}}/item_tokens.parquet"),
        scores_b=per_benchmark(f"{RESULTS}/evaluate/model={{model_b}}/benchmark={{benchmark}}/scores.parquet"),
        concepts_b=f"{RESULTS}/concepts/model={{model_b}}/layer={{layer_b}}/concepts.parquet",
        labels_b=f"{RESULTS}/labels/model={{model_b}}/layer={{layer_b}}/labels.parquet",
        sae_cfg_b=f"{RESULTS}/sae/model={{model_b}}/layer={{layer_b}}/cfg.json",
    output:
        markdown=f"{RESULTS}/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}/cross_model.md",
        table=f"{RESULTS}/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}/cross_model.csv",
        summary=f"{RESULTS}/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}/cross_model.json",
        benchmarks=f"{RESULTS}/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}/benchmarks.csv",
        figure=report(
            f"{RESULTS}/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}/cross_model.png",
            caption="../report/cross_model.rst",
            category="Cross-model",
            subcategory="{model_a} (layer {layer_a}) vs {model_b} (layer {layer_b})",
            labels={"figure": "concepts whose χ_model differs most between the models"},
        ),
        svg=f"{RESULTS}/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}/cross_model.svg",
    wildcard_constraints:
        model_a=alternatives(MODELS),
        model_b=alternatives(MODELS),
        layer_a=r"\d+",
        layer_b=r"\d+",
    params:
        spec=lambda wc: spec_json(config, "compare"),
        out_dir=lambda wc, output: os.path.dirname(output.markdown),
        sae_dir_a=lambda wc, input: os.path.dirname(input.sae_cfg_a),
        sae_dir_b=lambda wc, input: os.path.dirname(input.sae_cfg_b),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/compare/model_a={{model_a}}/layer_a={{layer_a}}/model_b={{model_b}}/layer_b={{layer_b}}.tsv"
    resources:
        # Each model's saliency streams into a sparse concepts × shared items matrix (12 B a row held, about 45 B
        # a row while it is built; measured 3.6 GB for 70 million rows): 8,000 MB covers about 10^5 items of
        # 700 active concepts in each model; raise it beyond (snakemake --set-resources compare_models:mem_mb=...).
        mem_mb=8000,
        runtime=30,
    shell:
        "python -m competency_gaps compare --spec {params.spec:q} "
        "--name-a '{wildcards.model_a} (layer {wildcards.layer_a})' --sae-dir-a {params.sae_dir_a} "
        "--saliency-a {input.saliency_a} --tokens-a {input.tokens_a} --scores-a {input.scores_a} "
        "--concepts-a {input.concepts_a} --labels-a {input.labels_a} "
        "--name-b '{wildcards.model_b} (layer {wildcards.layer_b})' --sae-dir-b {params.sae_dir_b} "
        "--saliency-b {input.saliency_b} --tokens-b {input.tokens_b} --scores-b {input.scores_b} "
        "--concepts-b {input.concepts_b} --labels-b {input.labels_b} --out-dir {params.out_dir} 2> {log}"


rule flipped_extract:
    """compare.flipped_sae: the SAE of {sae_model} at {layer} reads {model}'s activations at the same layer, on one
    benchmark's prompts (the extract stage, with another model's SAE)."""
    input:
        unpack(scores_if_response),
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
        item_table=f"{RESULTS}/benchmarks/benchmark={{benchmark}}/items.parquet",
        sae_cfg=f"{RESULTS}/sae/model={{sae_model}}/layer={{layer}}/cfg.json",
        sae_weights=f"{RESULTS}/sae/model={{sae_model}}/layer={{layer}}/sae_weights.safetensors",
    output:
        saliency=f"{FLIPPED}/benchmark={{benchmark}}/saliency.parquet",
        tokens=f"{FLIPPED}/benchmark={{benchmark}}/item_tokens.parquet",
        contexts=f"{FLIPPED}/benchmark={{benchmark}}/contexts.parquet",
    wildcard_constraints:
        sae_model=alternatives(MODELS),
    params:
        spec=lambda wc: spec_json(config, "extract", model=wc.model, benchmark=wc.benchmark, layer=wc.layer),
        scores=lambda wc, input: f"--scores {input.scores}" if "scores" in input.keys() else "",
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/flipped_extract/model={{model}}/layer={{layer}}/sae_of={{sae_model}}/benchmark={{benchmark}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/flipped_extract/model={{model}}/layer={{layer}}/sae_of={{sae_model}}/benchmark={{benchmark}}.tsv"
    threads: BENCHMARK_THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=1 if ON_GPU else 0,
        batch_tokens=lambda wc: throughput(config, wc.model)["batch_tokens"],
    shell:
        "OMP_NUM_THREADS={threads} python -m competency_gaps extract --model {wildcards.model} --benchmark {wildcards.benchmark} "
        "--layer {wildcards.layer} --spec {params.spec:q} --batch-tokens {resources.batch_tokens} --manifest {input.manifest} "
        "--sae-dir {params.sae_dir} --items {input.item_table} {params.scores} --out {output.saliency} "
        "--tokens {output.tokens} --contexts {output.contexts} 2> {log}"


rule flipped_reduce:
    """The gap tables of {model} in the concept space of {sae_model}'s SAE (the reducer, on the flipped shards and
    {model}'s own scores)."""
    input:
        saliency=per_benchmark(f"{FLIPPED}/benchmark={{benchmark}}/saliency.parquet"),
        tokens=per_benchmark(f"{FLIPPED}/benchmark={{benchmark}}/item_tokens.parquet"),
        scores=per_benchmark(f"{RESULTS}/evaluate/model={{model}}/benchmark={{benchmark}}/scores.parquet"),
        sae_cfg=f"{RESULTS}/sae/model={{sae_model}}/layer={{layer}}/cfg.json",
        labels=f"{RESULTS}/labels/model={{sae_model}}/layer={{layer}}/labels.parquet",
    output:
        concept_benchmark=f"{FLIPPED}/concept_benchmark.parquet",
        concepts=f"{FLIPPED}/concepts.parquet",
        benchmarks=f"{FLIPPED}/benchmarks.parquet",
        overlap=f"{FLIPPED}/overlap.parquet",
        thresholds=f"{FLIPPED}/thresholds.json",
        summary=f"{FLIPPED}/summary.md",
    wildcard_constraints:
        sae_model=alternatives(MODELS),
    params:
        spec=lambda wc: spec_json(config, "reduce"),
        out_dir=lambda wc, output: os.path.dirname(output.concepts),
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/flipped_reduce/model={{model}}/layer={{layer}}/sae_of={{sae_model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/flipped_reduce/model={{model}}/layer={{layer}}/sae_of={{sae_model}}.tsv"
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "python -m competency_gaps reduce --spec {params.spec:q} --sae-dir {params.sae_dir} --saliency {input.saliency} "
        "--tokens {input.tokens} --scores {input.scores} --labels {input.labels} --out-dir {params.out_dir} "
        "--title 'Competency gaps: model {wildcards.model} read by the SAE of {wildcards.sae_model}, layer {wildcards.layer}' 2> {log}"


rule flipped_sae:
    """The paper's flipped-SAE check: {sae_model}'s SAE concepts scored on {sae_model} and on {model}, compared by
    rank (flipped.md/.csv/.json)."""
    input:
        own=f"{RESULTS}/concepts/model={{sae_model}}/layer={{layer}}/concepts.parquet",
        flipped=f"{FLIPPED}/concepts.parquet",
        labels=f"{RESULTS}/labels/model={{sae_model}}/layer={{layer}}/labels.parquet",
    output:
        markdown=f"{FLIPPED}/flipped.md",
        table=f"{FLIPPED}/flipped.csv",
        summary=f"{FLIPPED}/flipped.json",
    wildcard_constraints:
        sae_model=alternatives(MODELS),
    params:
        spec=lambda wc: spec_json(config, "compare"),
        out_dir=lambda wc, output: os.path.dirname(output.markdown),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/flipped_sae/model={{model}}/layer={{layer}}/sae_of={{sae_model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/flipped_sae/model={{model}}/layer={{layer}}/sae_of={{sae_model}}.tsv"
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "python -m competency_gaps flipped-sae --spec {params.spec:q} --own {input.own} --flipped {input.flipped} "
        "--labels {input.labels} --sae-of '{wildcards.sae_model} (layer {wildcards.layer})' "
        "--reader '{wildcards.model} (layer {wildcards.layer})' --out-dir {params.out_dir} 2> {log}"
