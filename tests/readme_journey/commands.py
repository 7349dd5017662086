"""The README's command lines, each either run (with the options appended that shrink it) or excluded
with the reason CI cannot run it. tests/test_readme.py checks that every command is in one of the two."""


# Shrinking options: a model of one layer of width 32, a few steps; a BPE of 512 where the preset learns one
TINY = "--model.n_layer=1 --model.n_head=2 --model.n_embd=32 --model.block_size=32"
FEW_STEPS = ("--train.batch_size=4 --train.max_steps=4 --train.eval_interval=2 --train.eval_batches=1 "
             "--train.ckpt_interval=2 --train.log_interval=2 --train.sample_tokens=8")
TRAIN = f"{TINY} {FEW_STEPS}"
TRAIN_BPE = f"{TRAIN} --data.bpe_vocab=512"
SAMPLE = "--max_new_tokens=16"

# README command -> the options appended to it, each run by the journey below
RUN = {
    "python train.py": TRAIN_BPE,
    "python train.py --config=char --train.max_steps=200": TRAIN,
    "python train.py --data.corpus='my_texts/**/*.txt' --out_dir=out/mine --model.n_layer=6": TRAIN_BPE,
    "python -m gptjax.data prepare --data.corpus='web/*.jsonl.zst' --data.dir=shards/web": "--data.bpe_vocab=512",
    "python train.py --config=cpu-gpt2 --out_dir=out/gpt2-arch": TRAIN,
    "python train.py --data.dir=shards/web --out_dir=out/web": TRAIN_BPE,
    "python train.py --data.mix='web=shards/web:0.7,notes=my_texts:0.3' --out_dir=out/mix": TRAIN_BPE,
    "python train.py --train.resume=true": f"{TRAIN_BPE} --train.max_steps=6",
    "python sample.py --checkpoint=out/run --prompt='def fib(n):' --max_new_tokens=100": SAMPLE,
    "python sample.py --checkpoint=out/run --num_samples=3 --temperature=0.9 --top_k=50 --top_p=0.95 --seed=1": SAMPLE,
    "echo 'import os' | python sample.py --checkpoint=out/run": SAMPLE,
    "python sample.py --checkpoint=out/run --prompt_file=prompt.txt --temperature=0": SAMPLE,
    "python sample.py --checkpoint=out/run --prompts_file=prompts.jsonl --output=samples.jsonl --num_samples=2": SAMPLE,
    r"python sample.py --checkpoint=out/run --prompt='def fib(n):' --stop='\n\n'": SAMPLE,
    # the local stand-in for the downloaded FineWeb parquet files, in GPT-2's tokenizer; the preset's model
    # trained at the tiny shape, since the run's point here is reading shards prepared apart
    "python -m gptjax.data prepare --config=gpt2-124m --data.corpus='fineweb/*.parquet' --data.dir=shards/fineweb": "",
    "python train.py --config=gpt2-124m --data.dir=shards/fineweb": f"{TRAIN} --train.grad_accum=1",
    "gptjax convert from-hf gpt2 out/gpt2": "",
    "python sample.py --checkpoint=hf:gpt2 --prompt='The meaning of life is'": SAMPLE,
    # the source's model shape: only training options are appended
    "python train.py --train.init_from=out/gpt2 --data.corpus=my.txt --out_dir=out/tuned": FEW_STEPS,
    "gptjax convert to-hf out/tuned tuned-hf": "",
    "python -m gptjax.eval out/run --text=held_out.txt": "",
    # the gpt2 folder here is the tiny cpu-gpt2 run's, of a 32-token context
    "python -m gptjax.eval hf:gpt2 --text='wiki/*.jsonl.zst' --stride=512 --batch_size=16": "--stride=16",
    "python -m gptjax.eval out/run --task=hellaswag_val.jsonl,lambada.jsonl --output=eval.json": "",
    "python -m gptjax.eval out/mix --text='web=held_out/web.jsonl.zst,notes=held_out/notes'": "",
    "python -m gptjax.eval out/mix --text=mix": "",
    "gptjax memory --config=gpt2-1.5b --train.devices=8": f"{TINY} --train.batch_size=8 --train.grad_accum=1",
    "gptjax memory --config=gpt2-1.5b --train.devices=8 --train.remat=block":
        f"{TINY} --train.batch_size=8 --train.grad_accum=1",
    'export XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=4" JAX_PLATFORMS=cpu': "",
    "for i in 0 1; do\npython train.py --config=char --out_dir=out/two --train.max_steps=30 "
    "--dist.coordinator=127.0.0.1:12355 --dist.num_processes=2 --dist.process_id=$i &\ndone; wait":
        f"{TINY} --train.batch_size=8 --train.max_steps=2 --train.eval_interval=2 --train.eval_batches=1 "
        "--train.sample_tokens=0",
    "python sample.py --checkpoint=out/two --prompt='def '": SAMPLE,
}

BENCHMARK = "a benchmark: it measures for minutes by design (tests/bench/test_bench.py checks its arms' options only)"
EXCLUDED = {
    "gptjax serve out/run --port=8000 --slots=16":
        "a server: it runs until stopped (tests/inference/test_serve.py serves a model and asks it through openai "
        "and raw HTTP)",
    "curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' -d '{\"prompt\": \"def \", "
    "\"max_tokens\": 32, \"temperature\": 0}'":
        "asks the server above, which CI does not start (tests/inference/test_serve.py sends such requests)",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && python train.py":
        "set-up: creates a virtual environment and installs gptjax, as .ci/run does on a fresh clone before the "
        "suite; its last command, python train.py, is the quick tour's first, run here",
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest':
        "set-up and the test command itself: .ci/run creates the environment, installs gptjax and runs this suite",
    "python -m gptjax.bench serve --clients 1 4 16 64 --slots 16": BENCHMARK,
    "python -m gptjax.bench quality --budget 150 --arms gpt2,rope,rmsnorm,qk_norm,relu2,swiglu": BENCHMARK,
    'python -m gptjax.bench quality --budget 150 --arms "gpt2,untied,no_bias,gqa,muon,bpe8k,cpu:" --half': BENCHMARK,
    "python -m gptjax.bench quality --steps 150 --arms gpt2,doc_mask,align,mix": BENCHMARK,
    "python -m gptjax.bench quality --steps 150 --arms seed1,doc_mask+seed1,align+seed1,mix+seed1": BENCHMARK,
    "lm_eval --model gptjax --model_args path=out/run --tasks hellaswag,lambada_openai --batch_size 16":
        "a download: the harness fetches HellaSwag's and LAMBADA's data from the Hugging Face hub "
        "(tests/eval/test_harness.py runs lm_eval --model gptjax offline on local tasks)",
    "lm_eval --model gptjax --model_args path=hf:gpt2,stride=512 --tasks wikitext":
        "a download: the harness fetches WikiText from the Hugging Face hub",
    "lm_eval --model local-completions --model_args base_url=http://localhost:8000/v1/completions,model=run,"
    "tokenizer_backend=remote,max_length=1024,num_concurrent=8 --tasks hellaswag":
        "a download and a server: the harness fetches HellaSwag, and asks the server above, which CI does not start "
        "(tests/eval/test_harness.py runs local-completions against a served model on local tasks)",
    "python train.py --train.wandb=my-gpts --train.wandb_tags=stdlib,cpu --out_dir=out/stdlib":
        "a W&B login: without one W&B refuses to start the run; offline mode is WANDB_MODE=offline, an environment "
        "variable rather than an appended option (tests/train/test_run_logs.py trains into an offline W&B run and reads "
        "it back)",
    "python train.py --config=gpt2-124m": "a GPU or TPU: GPT-2 124M at half a million tokens a step, pmap over "
                                          "every local accelerator",
    "python train.py --config=gpt2-1.5b --train.parallel=fsdp": "a GPU or TPU: GPT-2 1.5B sharded over 8 GPUs",
    "#!/bin/bash\n#SBATCH --nodes=4 --ntasks-per-node=8 --gpus-per-node=8\n"
    "srun python train.py --config=gpt2-1.5b --train.parallel=fsdp --out_dir=/shared/runs/gpt2-xl":
        "a SLURM cluster: an sbatch script of 4 nodes x 8 GPUs under srun",
    'gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all --command="cd gptjax && '
    ".venv/bin/python train.py --config=gpt2-1.5b --train.parallel=fsdp --dist.coordinator=auto "
    '--out_dir=/mnt/shared/gpt2-xl"': "a TPU pod: gcloud runs the command on every worker of the pod",
    "export XLA_FLAGS=--xla_force_host_platform_device_count=4":
        "the set-up of the GPT-2 350M memory measurement that follows it",
    "for i in 0 1; do\n/usr/bin/time -v -o p$i.time python train.py --config=gpt2-350m --train.parallel=fsdp "
    "--model.scan_layers=true --train.remat=block --model.block_size=256 --train.batch_size=8 --train.grad_accum=1 "
    "--model.dtype=float32 --data.tokenizer=byte --model.vocab_size=50304 --data.corpus=CORPUS --out_dir=out/m350 "
    "--train.max_steps=2 --train.ckpt_interval=1000 --train.eval_batches=1 --train.sample_tokens=0 "
    "--dist.timeout=1800 --dist.coordinator=127.0.0.1:29517 --dist.num_processes=2 --dist.process_id=$i &\n"
    "done; wait": "a benchmark: the resident memory of two processes training GPT-2 350M (5 GB each, minutes on "
                  "2 cores) on a CORPUS the reader picks, measured by /usr/bin/time",
}
