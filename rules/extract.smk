rule extract:
    """Per-item concept saliency s_i^c of one benchmark at one layer, as one sparse Parquet shard."""
    input:
        unpack(scores_if_response),
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
        item_table=f"{RESULTS}/benchmarks/benchmark={{benchmark}}/items.parquet",
        sae_cfg=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/cfg.json",
        sae_weights=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/sae_weights.safetensors",
    output:
        saliency=f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/saliency.parquet",
        tokens=f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/item_tokens.parquet",
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
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=lambda wc: 1 if config["device"] == "cuda" else 0,
    shell:
        "OMP_NUM_THREADS={threads} competency-gaps extract --model {wildcards.model} --benchmark {wildcards.benchmark} "
        "--layer {wildcards.layer} --spec {params.spec:q} --manifest {input.manifest} --sae-dir {params.sae_dir} "
        "--items {input.item_table} {params.scores} --out {output.saliency} --tokens {output.tokens} 2> {log}"
