rule reduce_concepts:
    """Concept × benchmark table (χ_bench, χ_model, support, ESS, missing) and the per-concept suite table."""
    input:
        # Exactly one shard per configured benchmark: the reducer never globs result folders.
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
        labels=f"{RESULTS}/labels/model={{model}}/layer={{layer}}/labels.parquet",
        # Quoted in summary.md; the robustness checks read the shards, not these tables, so no cycle.
        stability=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/stability.json",
        validity=f"{RESULTS}/robustness/model={{model}}/layer={{layer}}/validity.json",
    output:
        concept_benchmark=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/concept_benchmark.parquet",
        concepts=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/concepts.parquet",
        benchmarks=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/benchmarks.parquet",
        overlap=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/overlap.parquet",
        thresholds=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/thresholds.json",
        summary=f"{RESULTS}/concepts/model={{model}}/layer={{layer}}/summary.md",
    params:
        spec=lambda wc: spec_json(config, "reduce"),
        out_dir=lambda wc, output: os.path.dirname(output.concepts),
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/reduce/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/reduce/model={{model}}/layer={{layer}}.tsv"
    resources:
        mem_mb=8000,
        runtime=30,
    shell:
        "python -m competency_gaps reduce --spec {params.spec:q} --sae-dir {params.sae_dir} --saliency {input.saliency} "
        "--tokens {input.tokens} --scores {input.scores} --labels {input.labels} --stability {input.stability} "
        "--validity {input.validity} --out-dir {params.out_dir} --title 'Competency gaps: model {wildcards.model}, layer {wildcards.layer}' 2> {log}"
