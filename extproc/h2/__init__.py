"""HTTP/2 for the ext_proc server, split as python-hyper/h2 is: ``frames`` and ``hpack`` (the
wire format, no state beyond HPACK's table, no I/O), ``connection`` (the state machine: bytes
in, bytes and handler calls out) and ``limits`` (every bound the server enforces). The asyncio
driver is ``switchyard.extproc.h2grpc``."""
