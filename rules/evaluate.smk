rule evaluate:
    """Score every item of one benchmark with one model (p_i, response kept), or import the scores."""
    input:
        unpack(imported_scores_file),
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
        item_table=f"{RESULTS}/benchmarks/benchmark={{benchmark}}/items.parquet",
    output:
        scores=f"{RESULTS}/evaluate/model={{model}}/benchmark={{benchmark}}/scores.parquet",
    params:
        spec=lambda wc: spec_json(config, "evaluate", model=wc.model, benchmark=wc.benchmark),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/evaluate/model={{model}}/benchmark={{benchmark}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/evaluate/model={{model}}/benchmark={{benchmark}}.tsv"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=lambda wc: 1 if config["device"] == "cuda" else 0,
    shell:
        "OMP_NUM_THREADS={threads} competency-gaps evaluate --model {wildcards.model} --benchmark {wildcards.benchmark} "
        "--spec {params.spec:q} --manifest {input.manifest} --items {input.item_table} --out {output.scores} 2> {log}"
