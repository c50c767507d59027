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
    threads: BENCHMARK_THREADS
    priority: evaluation_priority
    resources:
        mem_mb=model_mem_mb,
        runtime=120,
        gpu=1 if ON_GPU else 0,
        # Batch sizes travel as resources, not params: they change speed, not results, and Snakemake
        # reruns a job whose params change.
        batch_size=lambda wc: throughput(config, wc.model)["batch_size"],
        generation_batch_size=lambda wc: throughput(config, wc.model)["generation_batch_size"],
    shell:
        "OMP_NUM_THREADS={threads} python -m competency_gaps evaluate --model {wildcards.model} --benchmark {wildcards.benchmark} "
        "--spec {params.spec:q} --batch-size {resources.batch_size} --generation-batch-size {resources.generation_batch_size} --manifest {input.manifest} --items {input.item_table} "
        "--out {output.scores} 2> {log}"
