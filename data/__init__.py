"""Training data.

``synthetic`` is the embedded default corpus: a seeded Markov-plus-recall source that needs no
download and whose exact entropy gives the loss floor a trained model is measured against.
"""

from stratagem.data.synthetic import CorpusEntropy, SyntheticConfig, SyntheticCorpus

__all__ = ["CorpusEntropy", "SyntheticConfig", "SyntheticCorpus"]
