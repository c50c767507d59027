rule corpus_contexts:
    """The labels' corpus pass for one (model, layer): a seeded slice of the SAE corpus read through the model and
    the SAE, keeping each concept's top contexts, a held-out sample of activating contexts and a pool of windows for
    non-activating examples. It reads the SAE and the corpus alone, so it runs beside the evaluations once the SAE
    is trained, on benchmark_threads like extraction, and a new benchmark does not rerun it."""
    input:
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
        corpus=f"{RESULTS}/sae_corpus/corpus.parquet",
        sae_cfg=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/cfg.json",
        sae_weights=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/sae_weights.safetensors",
    output:
        contexts=f"{RESULTS}/corpus_contexts/model={{model}}/layer={{layer}}/contexts.parquet",
        pool=f"{RESULTS}/corpus_contexts/model={{model}}/layer={{layer}}/negative_pool.safetensors",
    params:
        spec=lambda wc: spec_json(config, "corpus_contexts", model=wc.model, layer=wc.layer),
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/corpus_contexts/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/corpus_contexts/model={{model}}/layer={{layer}}.tsv"
    threads: BENCHMARK_THREADS
    priority: LONG_JOB_PRIORITY  # 65 s in the default run, one of the longest after the SAE
    resources:
        mem_mb=model_mem_mb,
        runtime=60,
        gpu=1 if ON_GPU else 0,
        batch_tokens=lambda wc: throughput(config, wc.model)["batch_tokens"],  # speed only: a resource, not a param
    shell:
        "OMP_NUM_THREADS={threads} python -m competency_gaps corpus-contexts --model {wildcards.model} "
        "--layer {wildcards.layer} --spec {params.spec:q} --batch-tokens {resources.batch_tokens} "
        "--manifest {input.manifest} --sae-dir {params.sae_dir} --corpus {input.corpus} --out {output.contexts} "
        "--pool {output.pool} 2> {log}"


rule labels:
    """What each concept of one (model, layer) is: its top contexts from the SAE corpus (corpus_contexts) and from
    the benchmark items (extraction), with per-token activations, the tokens its decoder direction promotes (logit
    lens), a label for every live concept and the label's detection score on held-out contexts; concept_cards.md
    is in the report."""
    input:
        manifest=f"{RESULTS}/models/model={{model}}/manifest.json",
        corpus_contexts=f"{RESULTS}/corpus_contexts/model={{model}}/layer={{layer}}/contexts.parquet",
        negative_pool=f"{RESULTS}/corpus_contexts/model={{model}}/layer={{layer}}/negative_pool.safetensors",
        sae_cfg=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/cfg.json",
        sae_weights=f"{RESULTS}/sae/model={{model}}/layer={{layer}}/sae_weights.safetensors",
        contexts=expand(
            f"{RESULTS}/extract/model={{model}}/benchmark={{benchmark}}/layer={{layer}}/contexts.parquet",
            benchmark=BENCHMARKS,
            allow_missing=True,
        ),
        neuronpedia=neuronpedia_export,  # an imported explanations file: editing it reruns the labels
    output:
        labels=f"{RESULTS}/labels/model={{model}}/layer={{layer}}/labels.parquet",
        contexts=f"{RESULTS}/labels/model={{model}}/layer={{layer}}/contexts.parquet",
        quality=f"{RESULTS}/labels/model={{model}}/layer={{layer}}/label_quality.json",
        cards=report(
            f"{RESULTS}/labels/model={{model}}/layer={{layer}}/concept_cards.md",
            caption="../report/concept_cards.rst",
            category="Concepts",
            subcategory="model {model}, layer {layer}",
            labels={"table": "concept cards"},
        ),
    params:
        spec=lambda wc: spec_json(config, "labels", model=wc.model, layer=wc.layer),
        sae_dir=lambda wc, input: os.path.dirname(input.sae_cfg),
        out_dir=lambda wc, output: os.path.dirname(output.labels),
        # Outside the outputs, so a rerun keeps the LLM answers it already paid for (resumable).
        llm_cache=lambda wc: f"{RESULTS}/labels/model={wc.model}/layer={wc.layer}.llm_cache.jsonl",
    conda:
        "../envs/competency-gaps.yaml"
    log:
        f"{RESULTS}/logs/labels/model={{model}}/layer={{layer}}.log",
    benchmark:
        f"{RESULTS}/benchmarks_runtime/labels/model={{model}}/layer={{layer}}.tsv"
    threads: MODEL_THREADS
    resources:
        mem_mb=model_mem_mb,
        runtime=60,
        gpu=1 if ON_GPU else 0,
    shell:
        "OMP_NUM_THREADS={threads} python -m competency_gaps labels --model {wildcards.model} --layer {wildcards.layer} "
        "--spec {params.spec:q} --manifest {input.manifest} --sae-dir {params.sae_dir} "
        "--corpus-contexts {input.corpus_contexts} --negative-pool {input.negative_pool} --contexts {input.contexts} "
        "--out-dir {params.out_dir} "
        "--llm-cache {params.llm_cache} --title 'Concept cards: model {wildcards.model}, layer {wildcards.layer}' 2> {log}"
