rule prepare_model:
    """Resolve a model source to something from_pretrained reads; converts a packaged GGUF once."""
    output:
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
    params:
        spec=lambda wc: spec_json(config, "prepare_model", model=wc.model),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/prepare_model/model={{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/prepare_model/model={{model}}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "competency-gaps prepare-model --model {wildcards.model} --spec {params.spec:q} --manifest {output.manifest} 2> {log}"
