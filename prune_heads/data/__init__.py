"""Calibration and evaluation text: documents from many sources, tokenised one document per sample."""

from .documents import iter_documents, register_source
from .tokens import (
           DataSpec,
           as_token_lists,
           batches,
           calibration_sequences,
           doc_start_ids,
           tokenize_documents,
)
from .wikitext import PACKAGED_WIKITEXT, WIKITEXT_REL, find_wikitext, split_text_documents, wikitext_documents

__all__ = ["PACKAGED_WIKITEXT", "WIKITEXT_REL", "DataSpec", "as_token_lists", "batches", "calibration_sequences",
           "doc_start_ids", "find_wikitext", "iter_documents", "register_source", "split_text_documents",
           "tokenize_documents", "wikitext_documents"]
