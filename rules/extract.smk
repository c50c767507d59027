rule extract:
    """Per-item concept saliency s_i^c of one benchmark at one layer, as one sparse Parquet shard, each
    concept's top contexts among the benchmark's items (for the labels stage), and how well the SAE
    reconstructs the tokens it read (for sae_quality)."""
    input:
        unpack(scores_if_response),
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
        item_table=f"{RESULTS}/benchmarks/benchmark={{benchmark}}/items.parquet",
        sae_cfg=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/cfg.json",
        sae_weights=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/sae_weights.safetensors",
    output:
        saliency=f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/saliency.parquet",
        tokens=f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/item_tokens.parquet",
        contexts=f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/contexts.parquet",
        sae_fit=f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/sae_fit.json",
    params:
        spec=lambda wc: spec_json(config, "extract", model=wc.model, benchmark=wc.benchmark, layer=wc.layer),
        scores=lambda wc, input: f"--scores {input.scores}" if "scores" in input.keys() else "",
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}.tsv"
    threads: BENCHMARK_THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=1 if ON_GPU else 0,
        batch_tokens=lambda wc: throughput(config, wc.model)["batch_tokens"],  # speed only: a resource, not a param
    shell:
        "OMP_NUM_THREADS={threads} python -m competency_gaps extract --model {wildcards.model} --benchmark {wildcards.benchmark} "
        "--layer {wildcards.layer} --spec {params.spec:q} --batch-tokens {resources.batch_tokens} --manifest {input.manifest} "
        "--sae-dir {params.sae_dir} --items {input.item_table} {params.scores} --out {output.saliency} "
        "--tokens {output.tokens} --contexts {output.contexts} --sae-fit {output.sae_fit} 2> {log}"
