"""llama-server's flags, as its README (generated from llama.cpp's ``common/arg.cpp``) documents them.

Every spelling of a flag is listed (llama.cpp has no abbreviations, but several long and short names per
flag), with the number of values it takes, so that a value such as ``-c`` after ``--alias`` stays a value.
Flags a newer llama.cpp adds are refused until they are catalogued or an operator allows them.
"""

from __future__ import annotations

from plugins.extra_args import FlagTable, Use, flags, use_instead

SOURCE = "set Model spec.source instead (the agent checks where models come from)"
AGENT = "the agent sets it"
GPUS = use_instead("Model spec.hardware.gpu.count (the agent picks the GPUs)")

LLAMA_SERVER = FlagTable(
    "llama-server",
    "[executors.llamacpp] extra_args_allowed",
    (
        # Sampling, chat templates, reasoning, timeouts and threads: none of them allocates, listens or reads.
        *flags(
            Use.ALLOWED,
            "-t --threads N", "-tb --threads-batch N", "--threads-http N", "-to --timeout N",
            "-n --predict --n-predict N", "--keep N", "-s --seed SEED", "--samplers SAMPLERS",
            "--sampler-seq --sampling-seq SEQUENCE", "--ignore-eos", "--temp --temperature N", "--top-k N",
            "--top-p N", "--min-p N", "--top-nsigma --top-n-sigma N", "--xtc-probability N", "--xtc-threshold N",
            "--typical --typical-p N", "--repeat-last-n N", "--repeat-penalty N", "--presence-penalty N",
            "--frequency-penalty N", "--dry-multiplier N", "--dry-base N", "--dry-allowed-length N",
            "--dry-penalty-last-n N", "--dry-sequence-breaker STRING", "--adaptive-target N", "--adaptive-decay N",
            "--dynatemp-range N", "--dynatemp-exp N", "--mirostat N", "--mirostat-lr N", "--mirostat-ent N",
            "-l --logit-bias BIAS", "--grammar GRAMMAR", "-j --json-schema SCHEMA", "-r --reverse-prompt PROMPT",
            "-sp --special", "-e --escape --no-escape", "--perf --no-perf", "--context-shift --no-context-shift",
            "--warmup --no-warmup", "--spm-infill", "-a --alias STRING", "--chat-template JINJA_TEMPLATE",
            "--chat-template-kwargs STRING", "--jinja --no-jinja", "--reasoning-format FORMAT",
            "-rea --reasoning MODE", "--reasoning-budget N", "--reasoning-budget-message MESSAGE",
            "--prefill-assistant --no-prefill-assistant", "-sps --slot-prompt-similarity SIMILARITY",
            "--cache-reuse N", "--metrics", "--slots --no-slots", "--rope-scaling TYPE", "--rope-scale N",
            "--rope-freq-base N", "--rope-freq-scale N", "--yarn-orig-ctx N", "--yarn-ext-factor N",
            "--yarn-attn-factor N", "--yarn-beta-slow N", "--yarn-beta-fast N",
        ),
        *flags(Use.MEMORY, "-c --ctx-size N", instead=use_instead("spec.contextSize")),
        *flags(Use.MEMORY, "-np --parallel N", instead=use_instead("spec.parallelSlots")),
        *flags(Use.MEMORY, "-b --batch-size N", instead=use_instead("spec.batchSize")),
        *flags(Use.MEMORY, "-ub --ubatch-size N", instead=use_instead("spec.uBatchSize")),
        *flags(Use.MEMORY, "-ctk --cache-type-k TYPE", instead=use_instead("spec.cacheTypeK")),
        *flags(Use.MEMORY, "-ctv --cache-type-v TYPE", instead=use_instead("spec.cacheTypeV")),
        *flags(Use.MEMORY, "-fa --flash-attn MODE", instead=use_instead("spec.flashAttention")),
        *flags(Use.MEMORY, "-ngl --gpu-layers --n-gpu-layers N", instead=use_instead("Model spec.hardware.gpu.layers")),
        *flags(Use.MEMORY, "-mg --main-gpu INDEX", "-dev --device LIST", "-sm --split-mode MODE",
               "-ts --tensor-split LIST", instead=GPUS),
        *flags(Use.MEMORY, "--mlock", instead=use_instead("mlock in the agent's config ([executors.llamacpp])")),
        *flags(Use.MEMORY, "-cram --cache-ram N", "-kvu --kv-unified -no-kvu --no-kv-unified", "--swa-full",
               instead=AGENT),
        *flags(
            Use.MEMORY,
            "--mmap --no-mmap", "-dio --direct-io -ndio --no-direct-io", "--numa TYPE", "-ot --override-tensor LIST",
            "-cmoe --cpu-moe", "-ncmoe --n-cpu-moe N", "-fit --fit MODE", "-fitt --fit-target LIST",
            "-fitc --fit-ctx N", "-kvo --kv-offload -nkvo --no-kv-offload", "--repack -nr --no-repack", "--no-host",
            "-dt --defrag-thold N", "--override-kv LIST", "--op-offload --no-op-offload",
            "-ctxcp --ctx-checkpoints --swa-checkpoints N", "-cpent --checkpoint-every-n-tokens N",
            "--clear-idle --no-clear-idle", "--image-min-tokens N", "--image-max-tokens N",
            "--mmproj-offload --no-mmproj-offload", "-bs --backend-sampling", "--models-max N",
            # speculative decoding: a second context (and usually a second model)
            "-ctkd --cache-type-k-draft TYPE", "-ctvd --cache-type-v-draft TYPE", "-cd --ctx-size-draft N",
            "-devd --device-draft LIST", "-ngld --gpu-layers-draft --n-gpu-layers-draft N",
            "-otd --override-tensor-draft LIST", "-cmoed --cpu-moe-draft", "-ncmoed --n-cpu-moe-draft N",
            "--draft --draft-n --draft-max N", "--draft-min --draft-n-min N", "--draft-p-min P",
            "--spec-type TYPE", "--spec-ngram-size-n N", "--spec-ngram-size-m N", "--spec-ngram-min-hits N",
            "--spec-replace TARGET DRAFT", "-td --threads-draft N", "-tbd --threads-batch-draft N",
        ),
        *flags(Use.NETWORK, "--host HOST", instead="the agent sets it (servers.host in its config)"),
        *flags(Use.NETWORK, "--port PORT", "--reuse-port", instead="the agent sets it (servers.ports in its config)"),
        *flags(Use.NETWORK, "--api-prefix PREFIX", instead="the agent probes /health"),
        *flags(Use.NETWORK, "--webui-mcp-proxy --no-webui-mcp-proxy"),
        *flags(Use.FILES, "-m --model FNAME", "-mu --model-url URL", "-dr --docker-repo REPO",
               "-hf -hfr --hf-repo REPO", "-hff --hf-file FILE", instead=SOURCE),
        *flags(
            Use.FILES,
            "-hfd -hfrd --hf-repo-draft REPO", "-hfv -hfrv --hf-repo-v REPO", "-hffv --hf-file-v FILE",
            "-hft --hf-token TOKEN", "--lora FNAME", "--lora-scaled FNAME",
            "--control-vector FNAME", "--control-vector-scaled FNAME", "--control-vector-layer-range START END",
            "--log-file FNAME", "--grammar-file FNAME", "-jf --json-schema-file FILE",
            "-lcs --lookup-cache-static FNAME", "-lcd --lookup-cache-dynamic FNAME", "-mm --mmproj FILE",
            "-mmu --mmproj-url URL", "--mmproj-auto --no-mmproj --no-mmproj-auto", "--path PATH",
            "--webui-config-file PATH", "--api-key-file FNAME", "--ssl-key-file FNAME", "--ssl-cert-file FNAME",
            "--slot-save-path PATH", "--media-path PATH", "--allowed-local-media-path PATH", "--models-dir PATH",
            "--models-preset PATH", "--models-autoload --no-models-autoload", "--chat-template-file FILE",
            "-md --model-draft FNAME", "-mv --model-vocoder FNAME", "--tools LIST", "-cl --cache-list",
            # presets that download a model
            "--embd-gemma-default", "--embd-bge-small-en-default", "--embd-e5-small-en-default",
            "--embd-gte-small-default", "--fim-qwen-1.5b-default", "--fim-qwen-3b-default",
            "--fim-qwen-7b-default", "--fim-qwen-7b-spec", "--fim-qwen-14b-spec", "--fim-qwen-30b-default",
            "--gpt-oss-20b-default", "--gpt-oss-120b-default", "--vision-gemma-4b-default",
            "--vision-gemma-12b-default",
        ),
        # The agent reads the server's log (buffer sizes, readiness) and measures a loaded model.
        *flags(
            Use.MANAGED,
            "--log-disable", "--log-colors MODE", "-v --verbose --log-verbose", "-lv --verbosity --log-verbosity N",
            "--log-prefix", "--log-timestamps", "--sleep-idle-seconds SECONDS",
        ),
        *flags(
            Use.OTHER,
            "-h --help --usage", "--version", "--license", "--completion-bash", "--list-devices", "--verbose-prompt",
            "-C --cpu-mask M", "-Cr --cpu-range RANGE", "--cpu-strict N", "--prio N", "--poll N",
            "-Cb --cpu-mask-batch M", "-Crb --cpu-range-batch RANGE", "--cpu-strict-batch N", "--prio-batch N",
            "--poll-batch N", "--check-tensors", "--pooling TYPE", "-cb --cont-batching -nocb --no-cont-batching",
            "--cache-prompt --no-cache-prompt", "--embedding --embeddings", "--rerank --reranking",
            "--api-key KEY", "--props", "--webui --no-webui", "--webui-config JSON", "--tags STRING",
            "--skip-chat-parsing --no-skip-chat-parsing", "--tts-use-guide-tokens", "--offline",
            "--lora-init-without-apply",
        ),
    ),
)  # fmt: skip
