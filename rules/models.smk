rule convert_gguf:
    """De-quantise a packaged GGUF model once into a transformers safetensors folder (model + tokenizer)."""
    input:
        gguf=gguf_source,
    output:
        folder=directory(f"{RESULTS}/models/model={{model}}/hf"),
    wildcard_constraints:
        model=alternatives(GGUF_MODELS) or "(?!)",
    params:
        spec=lambda wc: spec_json(config, "convert_gguf", model=wc.model),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/convert_gguf/model={{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/convert_gguf/model={{model}}.tsv"
    resources:
        mem_mb=model_mem_mb,
        runtime=30,
    shell:
        "python -m competency_gaps convert-gguf --model {wildcards.model} --spec {params.spec:q} --out-dir {output.folder} 2> {log}"


rule prepare_model:
    """Write what from_pretrained loads: the converted folder (relative path), a local folder, or a hub id pinned to a commit."""
    input:
        unpack(converted_model),
    output:
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
    params:
        spec=lambda wc: spec_json(config, "prepare_model", model=wc.model),
        converted=lambda wc, input: f"--converted {input.converted}" if "converted" in input.keys() else "",
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/prepare_model/model={{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/prepare_model/model={{model}}.tsv"
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m competency_gaps prepare-model --model {wildcards.model} --spec {params.spec:q} {params.converted} "
        "--manifest {output.manifest} 2> {log}"
