"""Building blocks of the decoder: normalisation, rotary embeddings."""
