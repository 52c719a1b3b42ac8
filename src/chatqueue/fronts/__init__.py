"""Several API servers over one queue (`chatqueue serve --api-servers N`): N processes serve the
HTTP side (parsing, validation, history, the SSE writes), each over the one ChatQueue that the
core process runs (admission, the scheduler, the engine, the model process), so that the writes
of hundreds of streams are spread over more than one GIL.

`launch` starts the core and the API servers; `core` serves the queue to them over a Unix socket;
`client` is each API server's `QueueService` over that socket; `link` the messages between them.
"""
