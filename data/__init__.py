"""Training data.

- ``synthetic``: the embedded default corpus, a seeded Markov-plus-recall source that needs no
  download and whose exact entropy gives the loss floor a trained model is measured against.
- ``sources``, ``tokenizer``, ``prepare``: text files (txt, JSONL, Parquet) to a sentencepiece
  tokenizer and to packed, resumable MDS shards.
- ``streaming``: training batches from prepared shards through mosaicml-streaming (mixtures,
  elastic determinism, exact resume); ``loader``: the synthetic corpus's batches.
- ``config``, ``pipeline``: the ``[data]`` section and choosing a run's batches from it.
"""

from stratagem.data.synthetic import CorpusEntropy, SyntheticConfig, SyntheticCorpus

__all__ = ["CorpusEntropy", "SyntheticConfig", "SyntheticCorpus"]
