rule sae_corpus:
    """Seeded sample of offline text documents for SAE training (shared by every model)."""
    input:
        unpack(corpus_sources),  # extra local text files: editing one reruns the corpus
    output:
        corpus=f"{RESULTS}/sae_corpus/corpus.parquet",
    params:
        spec=lambda wc: spec_json(config, "corpus"),
        # A new release of the corpus wheel reruns the corpus (its files live in site-packages).
        package_version=package_version(config["sae_corpus"]["sae_probes_package"]),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/sae_corpus.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/sae_corpus.tsv"
    resources:
        mem_mb=4000,
        runtime=10,
    shell:
        "python -m competency_gaps corpus --spec {params.spec:q} --out {output.corpus} 2> {log}"


rule sae:
    """The SAE of one (model, layer): trained with sae-lens here, or a pretrained/local one copied in."""
    input:
        unpack(needs_model),
    output:
        cfg=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/cfg.json",
        weights=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/sae_weights.safetensors",
        summary=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/summary.json",
    params:
        spec=lambda wc: spec_json(config, "sae", model=wc.model, layer=wc.layer),
        inputs=lambda wc, input: " ".join(f"--{k} {v}" for k, v in input.items()),
        out_dir=lambda wc, output: os.path.dirname(output.cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/sae/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/sae/model={{model}}/layer={{layer}}.tsv"
    # Only training runs the model; copying a pretrained SAE needs one thread and no GPU.
    threads: lambda wc: MODEL_THREADS if trains_sae(wc) else 1
    # First among the jobs ready with it: extraction, labels and every table wait for the SAE, while the
    # per-benchmark evaluations can fill the cores later, side by side with the extractions. Snakemake adds up the
    # priorities of the jobs it could start together, so this must exceed those of the evaluations (1 or 2 each, one a
    # core) that would fit in the SAE's place.
    priority: 50
    resources:
        mem_mb=sae_mem_mb,  # follows from d_model and the shuffle buffer, not from training_tokens
        runtime=sae_runtime,
        gpu=lambda wc: 1 if ON_GPU and trains_sae(wc) else 0,
        batch_tokens=lambda wc: throughput(config, wc.model)["batch_tokens"],  # speed only: a resource, not a param
    shell:
        "OMP_NUM_THREADS={threads} python -m competency_gaps sae --model {wildcards.model} --layer {wildcards.layer} --spec {params.spec:q} "
        "{params.inputs} --out-dir {params.out_dir} --mem-mb {resources.mem_mb} --batch-tokens {resources.batch_tokens} 2> {log}"


rule sae_quality:
    """The SAE on what extraction reads: explained variance, L0 and dead fraction on every benchmark's
    counted tokens (measured by the extract jobs as they read them, merged here), beside the held-out corpus
    figures. A rule of its own, so editing a benchmark reruns this merge, never the SAE's training."""
    input:
        summary=rules.sae.output.summary,
        fits=expand(f"{RESULTS}/extract/model={{{{model}}}}/benchmark={{benchmark}}/layer={{{{layer}}}}/sae_fit.json",
                    benchmark=BENCHMARKS),
    output:
        quality=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/quality.json",
    params:
        spec=lambda wc: spec_json(config, "sae_quality", model=wc.model, layer=wc.layer),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/sae_quality/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/sae_quality/model={{model}}/layer={{layer}}.tsv"
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "python -m competency_gaps sae-quality --model {wildcards.model} --layer {wildcards.layer} --spec {params.spec:q} "
        "--summary {input.summary} --fits {input.fits} --out {output.quality} 2> {log}"
