"""A run's mixture of sources read from disk: each source's shards (prepared ones as they are, corpora
prepared into <out_dir>/data/<NAME> by pipeline.prepare), one tokenizer for all, and the batches and
validation sets of gptjax.data.mix's draw.

Everything that can be refused is checked before anything is prepared: a prepared source of another
tokenizer (or, for a learned bpe, of another learned one), a prepared source with no validation split.
With a learned bpe and corpora among the sources, the one tokenizer is learned from each corpus's
training text in the mixture's proportions (at the run's first weights), then every corpus is
tokenized with it. No JAX here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptjax.config import DataConfig
from gptjax.data import align, documents, durable, mix
from gptjax.data.pipeline import BPE_SAMPLE_CHARS, prepare
from gptjax.data.shards import Dataset, check_fits, open_folders, read_meta
from gptjax.data.sources import MAX_PIECE_CHARS, PIECE_CHARS, corpus_files
from gptjax.errors import UserError
from gptjax.tokenizer import bpe_tokenizer, learn_bpe, ranks_to_text

MIX_TOKENIZER = "mix-tokenizer.json"  # the learned bpe of a mixture, beside its sources' folders


@dataclass
class Mixture:
    """The sources (gptjax.data.mix.Source), the schedule, and each source's Dataset in the same order
    (with --data.align=bos, each source's aligned windows too)."""

    sources: tuple
    schedule: tuple
    datasets: list
    on_exhausted: str
    aligned: list | None = None

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def weights(self, step: int) -> np.ndarray:
        return mix.weights_at(self.sources, self.schedule, step)

    def train_batch(self, block_size: int, seed: int, step: int, grad_accum: int, batch_size: int,
                    rows: slice = slice(None)):
        """Step `step`'s batch (its `rows`) as mix.mixed_train_batch draws it: (inputs, targets)."""
        x, y, _ = mix.mixed_train_batch(self.datasets, self.weights(step), block_size, seed, step, grad_accum,
                                        batch_size, rows, self.aligned)
        return x, y

    def rows_of_step(self, seed: int, step: int, count: int) -> np.ndarray:
        """Rows of the whole global batch each source gives at `step` (every process counts alike)."""
        which = mix.row_sources(self.weights(step), seed, step, count)
        return np.bincount(which, minlength=len(self.sources))

    def epochs(self, rows: np.ndarray, block_size: int) -> np.ndarray:
        return mix.epochs(rows, block_size, [d.train.size for d in self.datasets])


def _is_prepared(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "meta.json").is_file()


def _check_prepared(source, cfg: DataConfig, fine_tune: bool = False) -> dict:
    """A prepared source's meta, refused if its tokenizer is not the run's (with `fine_tune`, the model's it
    starts from) or it has no validation split."""
    meta = read_meta(Path(source.spec)) or {}
    if meta.get("tokenizer") != cfg.tokenizer:
        whose = (", the tokenizer of the model it starts from (--train.init_from), which reads only its own tokens"
                 if fine_tune else "")
        raise UserError(f"the mix source {source.name!r} ({source.spec}) holds shards of the {meta.get('tokenizer')} "
                        f"tokenizer, but this run uses {cfg.tokenizer}{whose}: a mixture has one tokenizer. Prepare "
                        f"it again with --data.tokenizer={cfg.tokenizer}, or give its corpus instead; nothing was "
                        "changed.")
    if not int(meta.get("val_tokens", 0)):
        raise UserError(f"the mix source {source.name!r} ({source.spec}) has no validation split (0 val tokens): "
                        "each source of a mixture is validated on its own. Prepare it again with a "
                        "--data.val_fraction above 0 or a --data.val_corpus; nothing was changed.")
    return meta


def _given_tokenizer(sources, prepared: dict, cfg: DataConfig):
    """For a learned bpe: the prepared sources' one tokenizer (they must all have the same), else None."""
    if cfg.tokenizer != "bpe" or not prepared:
        return None
    toks = {name: open_folders([Path(spec)], cfg.tokenizer).tokenizer for name, spec in prepared.items()}
    first_name, first = next(iter(toks.items()))
    for name, tok in toks.items():
        if not tok.same_as(first):
            raise UserError(f"the mix sources {first_name!r} and {name!r} were prepared with different learned bpe "
                            "tokenizers: a mixture has one tokenizer. Give their corpora instead, and the mixture "
                            "learns one for all; nothing was changed.")
    return first


def _learn_key(corpora: list, cfg: DataConfig) -> str:
    """What the mixture's learned tokenizer depends on: the corpora's files and weights, and the settings."""
    h = hashlib.sha256(f"{cfg.bpe_vocab}|{cfg.val_fraction}|{cfg.text_field}|{BPE_SAMPLE_CHARS}".encode())
    for source, files in corpora:
        h.update(f"|{source.name}:{source.weight!r}".encode())
        for f in files:
            st = f.stat()
            h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _learn(corpora: list, cfg: DataConfig, folder: Path, log):
    """A bpe learned from each corpus's training text, in proportion to its weight; kept in
    `folder`/MIX_TOKENIZER, so that a resumed run (and the other processes) read it instead of learning it."""
    key, path = _learn_key(corpora, cfg), folder / MIX_TOKENIZER
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("key") == key:
        return bpe_tokenizer(saved["ranks"])
    total = sum(s.weight for s, _ in corpora) or 1.0
    texts = []
    for source, files in corpora:
        split = documents.plan(files, cfg, False, PIECE_CHARS, MAX_PIECE_CHARS)
        limit = max(1, int(BPE_SAMPLE_CHARS * source.weight / total))
        texts.append(documents.TrainingTexts(files, cfg, split, limit, PIECE_CHARS, MAX_PIECE_CHARS))
    ranks = ranks_to_text(learn_bpe(itertools.chain.from_iterable(texts), cfg.bpe_vocab))
    folder.mkdir(parents=True, exist_ok=True)
    durable.write_json(path, {"key": key, "ranks": ranks})
    tok = bpe_tokenizer(ranks)
    log(f"data: learned one bpe tokenizer of {tok.vocab_size:,} tokens for the mixture from "
        + ", ".join(f"{t.chars:,} characters of {s.name}" for (s, _), t in zip(corpora, texts))
        + " (their training text, in the mixture's proportions)")
    return tok


def load(cfg: DataConfig, default_dir: Path, block_size: int, log=print, tokenizer=None) -> Mixture:
    """The mixture of --data.mix: checked, then its corpora prepared (or reused) in `default_dir`/<NAME>.
    `tokenizer`: a learned bpe to prepare with (a fine-tune's source's) instead of learning one; `block_size`
    0 leaves out the check that each split holds a context window (for a preparation alone)."""
    sources, schedule = mix.check(cfg)
    prepared = {s.name: s.spec for s in sources if _is_prepared(s.spec)}
    for s in sources:
        if s.name in prepared:
            _check_prepared(s, cfg, fine_tune=tokenizer is not None)
    corpora = [(s, corpus_files(s.spec, option=f"mix source {s.name}")) for s in sources if s.name not in prepared]
    given = _given_tokenizer(sources, prepared, cfg)
    if tokenizer is not None and given is not None and not given.same_as(tokenizer):
        raise UserError("a prepared mix source was made with another learned bpe tokenizer than the fine-tune's "
                        "source (--train.init_from); give its corpus instead. Nothing was changed.")
    given = tokenizer or given
    if cfg.tokenizer == "bpe" and given is None and corpora:
        first = dict(zip([s.name for s in sources], mix.weights_at(sources, schedule, 0)))  # the run's first weights
        given = _learn([(dataclasses.replace(s, weight=float(first[s.name])), files) for s, files in corpora], cfg,
                       Path(default_dir), log)
    datasets = []
    for s in sources:
        if s.name in prepared:
            ds = open_folders([Path(s.spec)], cfg.tokenizer)
            log(f"data: {s.name}: {ds.train.size:,} train / {ds.val.size:,} val tokens in {s.spec}")
        else:
            ds = prepare(dataclasses.replace(cfg, corpus=s.spec, mix="", mix_schedule=""), Path(default_dir) / s.name,
                         log, tokenizer=given)
        if not ds.val.size:
            raise UserError(f"the mix source {s.name!r} ({s.spec}) has no validation split: each source of a mixture "
                            "is validated on its own. Give it more documents or a larger --data.val_fraction.")
        if block_size:
            check_fits(ds, block_size)
        datasets.append(ds)
    aligned = None
    if cfg.align == "bos" and block_size:
        aligned = [align.of_split(d.train, d.tokenizer.eot_id, block_size, f"{s.name} train", log)
                   for s, d in zip(sources, datasets)]
    return Mixture(sources, schedule, datasets, cfg.on_exhausted, aligned)


def as_dataset(mixture: Mixture) -> Dataset:
    """The first source's data under the mixture's name: what a run records of its data and its tokenizer."""
    first = mixture.datasets[0]
    meta = {**first.meta, "source": "mix:" + ",".join(f"{s.name}={s.spec}:{s.weight:g}" for s in mixture.sources),
            "fingerprint": ",".join(str(d.meta.get("fingerprint")) for d in mixture.datasets)}
    return Dataset(first.train, first.val, meta, first.tokenizer)
