"""The data source of a run: the synthetic world (data.py), real text (textdata.py), or the
general text of the pretrain stage (corpus.py), from a TrainConfig's fields (train.py picks the
corpus for --stage pretrain, the world or text for the other stages by --data).
It lives here, above data.py, because it reads both layers (tests/test_layout.py)."""

from data import SyntheticWorld, world_config
from realtext.corpus import Corpus, CorpusConfig
from realtext.textdata import RealDataConfig, real_source


def make_world(cfg, vocab=()):
    """The data source: the synthetic world, or real text (--data real). `vocab` fixes a
    real source's compact vocabulary to θ_0's, so that a fine-tune reads tokens as θ_0 did."""
    if cfg.data == "synthetic":
        return SyntheticWorld(world_config(cfg))
    real = RealDataConfig(safety=cfg.safety_data, proxy=cfg.proxy_data, task=cfg.task_data,
                          helpful=cfg.align_helpful, data_dir=cfg.data_dir, block_size=cfg.block_size,
                          restrict_vocab=cfg.restrict_vocab, vocab_cap=cfg.vocab_cap, eval_examples=cfg.eval_examples,
                          vocab=tuple(vocab))
    return real_source(real)


def make_corpus(cfg):
    """The general text of the pretrain stage (realtext/corpus.py), in the vocabulary later runs use."""
    return Corpus(CorpusConfig(sources=cfg.pretrain_data, data_dir=cfg.data_dir, block_size=cfg.block_size,
                               restrict_vocab=cfg.restrict_vocab, vocab_cap=cfg.vocab_cap,
                               eval_examples=cfg.eval_examples))
