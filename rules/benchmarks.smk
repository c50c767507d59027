rule prepare_benchmark:
    """Read one benchmark's release files (or hub copy) into the normalised items table."""
    input:
        # The templates and every data file are inputs: editing one reruns this benchmark.
        unpack(benchmark_sources),
    output:
        item_table=f"{RESULTS}/benchmarks/benchmark={{benchmark}}/items.parquet",
        report=f"{RESULTS}/benchmarks/benchmark={{benchmark}}/prepare_report.json",
    params:
        spec=lambda wc: spec_json(config, "prepare", benchmark=wc.benchmark),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/prepare/benchmark={{benchmark}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/prepare/benchmark={{benchmark}}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "python -m competency_gaps prepare --benchmark {wildcards.benchmark} --spec {params.spec:q} "
        "--items {output.item_table} --report {output.report} 2> {log}"
