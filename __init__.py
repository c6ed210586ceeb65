"""stratagem: distributed pretraining of dense, mixture-of-experts and hybrid linear-attention models.

The package is mapped onto the repository root: ``stratagem.model``, ``stratagem.train`` ...
are the top-level folders of the checkout.
"""

__version__ = "0.1.0"
