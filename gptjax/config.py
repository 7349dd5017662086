"""Configuration as data: frozen dataclasses, one per section, each field with its help and checks.

The dataclass defaults are the CPU default run (`python train.py` with no arguments);
`configs/cpu.toml` spells them out and a test keeps the two equal. Reading them from the
command line and from TOML presets, and writing them back, is gptjax.options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gptjax import paths
from gptjax.errors import UserError


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = opt(4, "number of transformer blocks")
    n_head: int = opt(4, "attention heads per block")
    n_embd: int = opt(192, "model width (must be a multiple of n_head)")
    block_size: int = opt(128, "context length in tokens")
    vocab_size: int = opt(0, "vocabulary size; 0 takes the tokenizer's")
    pad_vocab_to: int = opt(64, "pad the embedding table to a multiple of this (padded ids are never predicted)")
    dropout: float = opt(0.0, "dropout rate in training")
    bias: bool = opt(True, "biases in linear layers and layer norms")
    pos_encoding: Literal["learned", "sincos", "rope", "none"] = opt(
        "learned", "position encoding: learned table (GPT-2), fixed sine/cosine, rotary (RoPE) or none")
    rope_base: float = opt(10000.0, "rotary encoding's base wavelength (with pos_encoding=rope)")
    norm: Literal["layernorm", "rmsnorm"] = opt("layernorm", "normalisation: LayerNorm (GPT-2) or RMSNorm")
    qk_norm: bool = opt(False, "RMS-normalise queries and keys per head before attention")
    mlp: Literal["gelu", "relu2", "swiglu"] = opt("gelu", "feed-forward layer: GELU (GPT-2), squared ReLU, or SwiGLU "
                                                          "(gated, 8/3 of the width wide)")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention, a divisor of n_head; 0: n_head")
    tie_embeddings: bool = opt(True, "the output layer is the token embedding (GPT-2); false: a layer of its own")
    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "compute dtype; parameters and softmax stay float32. auto: bfloat16 where the device multiplies it "
                "faster (GPUs, TPUs, CPUs with bfloat16 matrix units), float32 elsewhere")
    scan_layers: bool = opt(False, "stack the blocks' parameters on a leading layer axis and run them with one "
                                   "scanned block: compile time no longer grows with depth; checkpoints of either "
                                   "layout restore in the other")

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "pad_vocab_to"):
            _check(getattr(self, name) >= 1, f"model.{name} must be at least 1, got {getattr(self, name)}.")
        _check(self.vocab_size >= 0, f"model.vocab_size must be 0 (the tokenizer's) or positive, got {self.vocab_size}.")
        _check(
            self.n_embd % self.n_head == 0,
            f"model.n_embd ({self.n_embd}) must be a multiple of model.n_head ({self.n_head}); "
            f"for example n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}.",
        )
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}.")
        kv = self.n_kv_head or self.n_head
        _check(kv >= 1 and self.n_head % kv == 0,
               f"model.n_kv_head must divide model.n_head ({self.n_head}), or be 0 for n_head; got {self.n_kv_head}.")
        _check(self.pos_encoding != "rope" or (self.n_embd // self.n_head) % 2 == 0,
               f"rotary positions need an even head width; n_embd / n_head = {self.n_embd // self.n_head}.")
        _check(self.rope_base > 1, f"model.rope_base must be above 1, got {self.rope_base}.")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_width(self) -> int:
        """The feed-forward layer's hidden width: 4 x n_embd, or 8/3 of that for SwiGLU's two halves
        (the same parameters), rounded up to a multiple of 64."""
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        return -(-8 * self.n_embd // 3 // 64) * 64

    def is_gpt2(self) -> bool:
        """Whether this is GPT-2's own architecture (what Hugging Face's GPT2LMHeadModel holds)."""
        return (self.pos_encoding, self.norm, self.qk_norm, self.mlp, self.kv_heads, self.tie_embeddings,
                self.bias) == ("learned", "layernorm", False, "gelu", self.n_head, True, True)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m


@dataclass(frozen=True)
class DataConfig:
    corpus: str = opt("", "a file, a folder or a glob of text, JSON Lines (.jsonl) or Parquet files, each perhaps "
                          "compressed (.gz, .bz2, .xz, .zst); empty: the Python standard library's source")
    text_field: str = opt("text", "the field that holds a document's text in JSON Lines and Parquet files")
    tokenizer: Literal["gpt2", "byte", "bpe"] = opt(
        "gpt2", "tokenizer: the GPT-2 BPE; bytes, for character-level models; or bpe, a byte-level BPE learned from "
                "the training corpus when the shards are prepared (--data.bpe_vocab tokens)")
    bpe_vocab: int = opt(8192, "with --data.tokenizer=bpe: the learned vocabulary's size, the 256 bytes included")
    val_fraction: float = opt(0.02, "share of the corpus's documents held out for validation")
    val_corpus: str = opt("", "a separate validation corpus (same forms as --data.corpus) instead of a held-out share")
    dir: str = opt("", "where the token shards go; empty: <out_dir>/data. Several folders (comma-separated or a "
                       "glob) of prepared shards are read as one")
    workers: int = opt(0, "tokenizer processes when preparing the shards; 0: one per core")
    doc_mask: bool = opt(False, "attention stops at end-of-text: a token sees only the earlier tokens of its own "
                                "document inside the window, in training, validation and every score of the run")
    doc_positions: Literal["continue", "restart"] = opt(
        "continue", "with --data.doc_mask: positions go on across documents (continue) or restart at 0 at each "
                    "document's start (restart)")
    align: Literal["none", "bos"] = opt(
        "none", "where training windows start: anywhere in the token stream (none), or at a document's start, the "
                "rest of the window packed best-fit with whole documents (bos); what cannot fit is dropped, and "
                "counted at the start of training")
    mix: str = opt("", "a mixture of sources, NAME=SOURCE:WEIGHT,... (a shard folder, or a corpus file, folder or "
                       "glob); weights are relative, each batch draws from the sources by tokens in proportion")
    mix_schedule: str = opt("", "with --data.mix: weights that change at given steps, STEP:NAME=WEIGHT,...;... "
                                "starting at step 0")
    on_exhausted: Literal["repeat", "stop"] = opt(
        "repeat", "with --data.mix: a source read past its end is repeated (its epochs counted), or stops the run")

    def __post_init__(self):
        # a folder that a preparation writes as it is given (gptjax.data prepare): ~ is expanded here, once
        object.__setattr__(self, "dir", paths.expand_list(self.dir))
        _check(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}.")
        _check(self.workers >= 0, f"data.workers must be 0 (one per core) or more, got {self.workers}.")
        _check(512 <= self.bpe_vocab <= 1 << 20, f"data.bpe_vocab must be 512 to 1,048,576, got {self.bpe_vocab}.")
        _check(bool(self.text_field), "data.text_field must name a field, e.g. text.")
        _check(self.doc_mask or self.doc_positions == "continue",
               "--data.doc_positions=restart restarts positions at each document, which only --data.doc_mask=true "
               "makes a boundary of; add --data.doc_mask=true, or leave doc_positions at continue.")
        _check_mix(self)


def _check_mix(cfg: "DataConfig") -> None:
    """--data.mix stands alone; its entries and schedule are parsed by gptjax.data.mix.check before any preparation."""
    if not cfg.mix:
        _check(not cfg.mix_schedule, "--data.mix_schedule changes the weights of --data.mix, which is not given; "
                                     "add --data.mix='NAME=SOURCE:WEIGHT,...', or leave the schedule out.")
        return
    _check(not cfg.corpus and not cfg.dir,
           f"--data.mix names its own sources; it cannot be used with --data.corpus or --data.dir (given: corpus="
           f"{cfg.corpus!r}, dir={cfg.dir!r}). Put those sources in the mix, e.g. --data.mix='web=shards/web:1'.")
    _check(not cfg.val_corpus,
           "--data.val_corpus cannot be used with --data.mix: each source of a mixture is validated on its own "
           "held-out share. To validate a source on a corpus of its own, prepare it with python -m gptjax.data "
           "prepare --data.corpus=... --data.val_corpus=... --data.dir=FOLDER and put FOLDER in the mix.")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(8, "sequences per micro-batch, over all devices")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int = opt(500, "optimizer steps")
    lr: float = opt(2e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(40, "linear warm-up steps")
    weight_decay: float = opt(0.1, "weight decay, applied to matrices only")
    optimizer: Literal["adamw", "muon"] = opt("adamw", "adamw for everything, or muon for the blocks' weight matrices "
                                                       "and adamw for embeddings, output layer, norms and biases")
    muon_lr: float = opt(0.02, "peak learning rate of the matrices Muon updates (same schedule as lr)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 turns clipping off")
    eval_interval: int = opt(100, "steps between validation evaluations")
    eval_batches: int = opt(8, "batches per validation evaluation")
    eval_tasks: str = opt("", "zero-shot task files (.jsonl, comma-separated) scored at every evaluation and logged: "
                              "multiple choice (HellaSwag's layout) or last word (LAMBADA's), as python -m gptjax.eval "
                              "--task reads them")
    log_interval: int = opt(10, "steps between progress lines")
    ckpt_interval: int = opt(200, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = opt(3, "how many recent checkpoints to keep")
    seed: int = opt(0, "seed for initialisation, batches and dropout")
    resume: bool = opt(False, "continue from the latest checkpoint in out_dir")
    init_from: str = opt("", "fine-tune: start from these weights (a run directory or hf:DIR) and take their model shape")
    parallel: Literal["pmap", "fsdp"] = opt("pmap", "parallel strategy: pmap replicates the model on every device; "
                                            "fsdp shards parameters and optimizer state over them")
    devices: int = opt(0, "how many devices of each process to use; 0 uses all")
    mesh: str = opt("", "fsdp's device mesh: 'data:M,model:N' (or 'model:N', the rest on data) also splits "
                        "attention heads and feed-forward width over N devices (tensor parallelism); empty: "
                        "every device on data")
    loss_chunk: int = opt(2048, "tokens per cross-entropy chunk: the loss and its gradient are computed that many "
                               "tokens at a time, never holding the whole batch's logits; 0: all at once")
    remat: Literal["none", "block", "dots"] = opt("none", "recompute activations in the backward pass to save "
                                                  "memory: block keeps only each block's input, dots also its "
                                                  "matrix products; none keeps everything (fastest)")
    on_nonfinite: Literal["stop", "skip"] = opt("stop", "a NaN or infinite loss or gradient: stop the run, or skip that update")
    sample_tokens: int = opt(120, "tokens to sample at the end of training; 0 for none")
    sample_prompt: str = opt("", "the prompt of that sample (\\n for a new line); empty: a real line of the "
                                 "standard library on the default corpus, a document's start on any other")
    wandb: str = opt("", "log to Weights & Biases: the project's name (pip install \"gptjax[wandb]\"); empty: off. "
                         "WANDB_MODE=offline keeps the run in <out_dir>/wandb/ for wandb sync")
    wandb_name: str = opt("", "the W&B run's name; empty: the name of out_dir")
    wandb_tags: str = opt("", "the W&B run's tags, comma-separated")

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches",
                     "log_interval", "ckpt_interval", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"train.{name} must be at least 1, got {getattr(self, name)}.")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be 0 or more, got {self.warmup_steps}.")
        _check(self.lr > 0 and self.min_lr >= 0, f"train.lr must be positive and train.min_lr not negative, got {self.lr} and {self.min_lr}.")
        _check(self.muon_lr > 0, f"train.muon_lr must be positive, got {self.muon_lr}.")
        _check(self.grad_clip >= 0, f"train.grad_clip must be 0 (off) or positive, got {self.grad_clip}.")
        _check(self.loss_chunk >= 0, f"train.loss_chunk must be 0 (all at once) or more, got {self.loss_chunk}.")
        _check(self.sample_tokens >= 0, f"train.sample_tokens must be 0 or more, got {self.sample_tokens}.")
        _check(not self.mesh or self.parallel == "fsdp", f"train.mesh={self.mesh!r} lays the devices out for fsdp; "
               "add --train.parallel=fsdp (pmap keeps a whole replica on every device).")


@dataclass(frozen=True)
class DistConfig:
    coordinator: str = opt("", "host:port of process 0, for processes started by hand; 'auto': let JAX detect the "
                               "cluster (SLURM, Open MPI, TPU pod); empty: one process, unless SLURM or Open MPI "
                               "started several")
    num_processes: int = opt(0, "how many processes in all (with --dist.coordinator=host:port)")
    process_id: int = opt(-1, "this process's index, 0 to num_processes - 1 (with --dist.coordinator=host:port)")
    timeout: int = opt(300, "seconds to wait for the coordinator and every process before giving up")

    def __post_init__(self):
        _check(self.timeout >= 1, f"dist.timeout must be at least 1 second, got {self.timeout}.")
        if self.coordinator in ("", "auto"):
            _check(self.coordinator == "auto" or (self.num_processes, self.process_id) == (0, -1),
                   "--dist.num_processes and --dist.process_id need --dist.coordinator=host:port (process 0's "
                   "address), or --dist.coordinator=auto on a cluster JAX detects.")
            return
        host, colon, port = self.coordinator.rpartition(":")
        _check(bool(host and colon) and port.isdigit() and 0 < int(port) < 65536,
               f"--dist.coordinator must be host:port (e.g. 10.0.0.1:1234), 'auto' or empty; got {self.coordinator!r}.")
        _check(self.num_processes >= 1, f"--dist.coordinator={self.coordinator} needs --dist.num_processes "
                                        f"(how many processes in all); got {self.num_processes}.")
        _check(0 <= self.process_id < self.num_processes,
               f"--dist.process_id must be this process's index, 0 to {self.num_processes - 1}; got {self.process_id}.")


@dataclass(frozen=True)
class Config:
    config: str = opt("", "a preset: a name in configs/ (cpu, cpu-gpt2, char, gpt2-124m, …) or a path to a .toml "
                          "file. train.py takes cpu when none is given; --config= takes none, which leaves the base "
                          "defaults (those of cpu-gpt2)")
    out_dir: str = opt("out/run", "run directory: checkpoints, metrics, prepared data")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        # the run directory is used as it is given by many modules (lock, data, metrics, checkpoints, W&B):
        # ~ is expanded here, once, so that they all write into the same folder
        object.__setattr__(self, "out_dir", paths.expand_text(self.out_dir))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """The sampling controls' rules and messages, the one place they live: sample.py's options
    (SampleConfig) and every sampling call (gptjax.inference.generate.stream_ids) are checked here."""
    _check(max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    _check(temperature >= 0, f"temperature must be 0 (greedy) or positive, got {temperature}.")
    _check(top_k >= 0, f"top_k must be 0 (off) or positive, got {top_k}.")
    _check(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}.")


@dataclass(frozen=True)
class SampleConfig:
    checkpoint: str = opt("out/run", "a run directory (its latest checkpoint) or one checkpoint step directory")
    step: int = opt(-1, "which checkpoint step to load; -1 for the latest")
    prompt: str = opt("", "the prompt; empty: --prompt_file, else standard input when it is not a terminal")
    prompt_file: str = opt("", "read the prompt from this file")
    num_samples: int = opt(1, "how many continuations to draw")
    max_new_tokens: int = opt(200, "tokens to generate per sample")
    temperature: float = opt(0.8, "softmax temperature; 0 is greedy")
    top_k: int = opt(200, "keep only the k most likely tokens; 0 keeps all")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set with this much probability")
    seed: int = opt(0, "sampling seed")
    stream: bool = opt(True, "print a single sample token by token as it is decoded, when standard output is a terminal")
    prompts_file: str = opt("", "many prompts: a text file with one prompt per line, or a .jsonl file with a "
                                "\"prompt\" field on each line")
    output: str = opt("", "write the samples to this JSONL file, one line each: prompt, completion and the controls")
    batch_size: int = opt(16, "prompts decoded together")
    dtype: Literal["checkpoint", "float32", "bfloat16", "auto"] = opt(
        "checkpoint", "compute dtype for decoding: bfloat16 reads half the bytes per token; checkpoint: the run's "
                      "(float32 for hf:DIR)")
    stop: str = opt("", "end each sample before this string, which is not printed; \\n, \\t and \\\\ are escapes, "
                        "and several stop strings are a JSON list: --stop='[\"\\n\\n\", \"def \"]'")

    def __post_init__(self):
        _check(self.num_samples >= 1, f"num_samples must be at least 1, got {self.num_samples}.")
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}.")
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str = opt("", "what to evaluate: a run directory (its latest checkpoint), a checkpoint step directory "
                              "or hf:DIR (a Hugging Face GPT-2 folder); also the first argument without --checkpoint=")
    step: int = opt(-1, "which checkpoint step to load; -1 for the latest")
    text: str = opt("", "score this text: a file, a folder or a glob of text, JSON Lines (.jsonl) or Parquet files, "
                        "compressed or not, as --data.corpus takes, or a folder of prepared shards (its validation "
                        "split); or several, named: NAME=TEXT,... (as --data.mix names its sources), each scored on "
                        "its own and all together; mix: each source of the run's --data.mix, on its validation split")
    text_field: str = opt("text", "the field that holds a document's text in JSON Lines and Parquet files")
    stride: int = opt(0, "tokens between the starts of two scoring windows: each token is scored with at least "
                         "context - stride tokens before it; 1 gives every token the full context (at context times "
                         "the cost), the context itself windows that do not overlap; 0: half the context")
    task: str = opt("", "zero-shot task files, comma-separated: JSON Lines of multiple-choice examples "
                        "(ctx, endings, label: HellaSwag's layout) or last-word examples (text: LAMBADA's)")
    batch_size: int = opt(8, "windows (or task sequences) scored together")
    dtype: Literal["checkpoint", "float32", "bfloat16", "auto"] = opt(
        "checkpoint", "compute dtype: checkpoint: the run's (float32 for hf:DIR, as transformers computes)")
    output: str = opt("", "also write every figure, with the checkpoint, step and settings, to this JSON file")

    def __post_init__(self):
        _check(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}.")
        _check(self.stride >= 0, f"stride must be 0 (half the context) or positive, got {self.stride}.")
