rule robustness:
    """Resampling stability of χ_bench/χ_model (the paper's resamples) and predictive validity of the χ_model
    gaps on held-out items, from the same shards as reduce_concepts."""
    input:
        saliency=expand(
            f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/saliency.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        tokens=expand(
            f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/item_tokens.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        scores=expand(
            f"{RESULTS}/evaluate/model={{model}}/benchmark={{benchmark}}/scores.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        sae_cfg=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/cfg.json",
    output:
        stability=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/stability.parquet",
        stability_summary=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/stability.json",
        validity=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/validity.parquet",
        validity_summary=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/validity.json",
    params:
        spec=lambda wc: spec_json(config, "robustness"),
        out_dir=lambda wc, output: os.path.dirname(output.stability),
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/robustness/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/robustness/model={{model}}/layer={{layer}}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "{CLI} robustness --spec {params.spec:q} --sae-dir {params.sae_dir} --saliency {input.saliency} "
        "--tokens {input.tokens} --scores {input.scores} --out-dir {params.out_dir} 2> {log}"
