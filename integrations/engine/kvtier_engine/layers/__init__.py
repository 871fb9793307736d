"""Building blocks of the decoder: paged attention (`attention`: the backend protocol, the torch
reference and the contiguous cache for tests; `triton_attention`: the GPU kernel and the backend
choice), normalisation (`norm`), rotary embeddings (`rotary`)."""
