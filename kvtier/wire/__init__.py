"""The kvtier wire: the sans-IO codec and socket helpers shared by `kvtier_server` and every client.

`frames` is the frame format (schema, encoder, validation), `decoder` the incremental
`FrameDecoder` that runs it on a stream, `sockets` the socket settings and the vectored send both
sides use. Pure code over bytes and buffers except `sockets`; nothing here imports the server or a
tier, so a client loads only this package. Submodules are imported where used (no eager imports).
"""
