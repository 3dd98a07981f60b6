"""Every bound the ext_proc's HTTP/2 server enforces, in one place.

=============================  ==============  ===============================================
Limit                          Value           When exceeded
=============================  ==============  ===============================================
MAX_CONCURRENT_STREAMS         1,024           advertised; a further stream gets RST_STREAM
                                               REFUSED_STREAM (safe for the client to retry).
                                               A stream reset while its handler task runs counts
                                               until the task stops (CVE-2023-44487).
MAX_HEADER_LIST_SIZE           16 KiB          advertised; a decoded request header list over
                                               it gets gRPC RESOURCE_EXHAUSTED (trailers-only).
MAX_HEADER_BLOCK               32 KiB          compressed bytes of one header block, summed
                                               over HEADERS + CONTINUATION: GOAWAY
                                               ENHANCE_YOUR_CALM.
MAX_CONTINUATIONS              32              CONTINUATION frames in one block: GOAWAY
                                               ENHANCE_YOUR_CALM (CONTINUATION flood).
MAX_FRAME_SIZE                 1 MiB           advertised; a larger frame: GOAWAY
                                               FRAME_SIZE_ERROR.
MAX_MESSAGE                    9 MiB           one gRPC message (the 8 MiB body limit plus
                                               1 MiB of ext_proc fields); larger: gRPC
                                               RESOURCE_EXHAUSTED on that stream.
STREAM_WINDOW                  16 MiB          advertised initial stream window, returned per
                                               message; DATA beyond it: RST_STREAM
                                               FLOW_CONTROL_ERROR.
MAX_BUFFERED                   64 MiB          bytes one connection holds (partial and queued
                                               requests, replies blocked by the peer's flow
                                               control); DATA that would need more: RST_STREAM
                                               ENHANCE_YOUR_CALM on that stream. A whole
                                               message in one DATA frame needs no buffer and is
                                               still served.
CONTROL_BURST / CONTROL_RATE   1,000 / 100/s   token bucket for frames that make us answer
                                               (PING, SETTINGS), carry no work (PRIORITY,
                                               unknown types, empty DATA without END_STREAM)
                                               or make us reset a stream; empty: GOAWAY
                                               ENHANCE_YOUR_CALM (ping/settings/reset floods).
RESET_MIN_STREAMS /            500 / 1/2       once a connection opened 500 streams, more than
RESET_RATIO                                    half of them reset by the peer before we
                                               answered: GOAWAY ENHANCE_YOUR_CALM (rapid reset,
                                               Envoy's own premature-reset rule).
PREFACE_TIMEOUT                10 s            no client preface and SETTINGS: close.
IDLE_TIMEOUT                   600 s           nothing received (checked every 600 s) and no
                                               handler running: GOAWAY NO_ERROR with the
                                               largest stream id, then the final GOAWAY.
DRAIN_GRACE                    1 s             between the two GOAWAYs of that graceful close;
                                               then close once no stream is open, at most 30
                                               grace periods later.
=============================  ==============  ===============================================

The connection window we grant is 2^31-1, returned once half is used; DATA beyond it is a
FLOW_CONTROL_ERROR. The last 4 x MAX_CONCURRENT_STREAMS finished streams are remembered (ids
only, or the stream while the client may still send on it) to tell late frames from errors.

Protocol violations (RFC 9113) are connection errors (GOAWAY with PROTOCOL_ERROR,
FRAME_SIZE_ERROR, FLOW_CONTROL_ERROR, COMPRESSION_ERROR or STREAM_CLOSED, then close) or, where
the RFC allows, stream errors (RST_STREAM). The outbound side is bounded by the transport: the
driver stops reading while the socket's write buffer is over its high-water mark.

Why 1,024 streams: a routed request keeps its ext_proc stream open until its response has
passed (usage and cost are read from it), so streams are requests in flight, and long LLM
responses add up. Envoy opens another connection to a worker once one has 1,024 streams open;
its ext_proc cluster lifts the default circuit breaker of 1,024 requests (operator/envoy_config.py
``_EXTPROC_STREAMS``) so the cluster as a whole is not capped there.
"""

from __future__ import annotations

MAX_CONCURRENT_STREAMS = 1024
MAX_HEADER_LIST_SIZE = 16 * 1024
MAX_HEADER_BLOCK = 32 * 1024
MAX_CONTINUATIONS = 32
MAX_FRAME_SIZE = 1 << 20
MAX_MESSAGE = 9 * 1024 * 1024
STREAM_WINDOW = 16 * 1024 * 1024
MAX_BUFFERED = 64 * 1024 * 1024
CONTROL_BURST = 1000
CONTROL_RATE = 100.0
RESET_MIN_STREAMS = 500
RESET_RATIO = 0.5
PREFACE_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0
DRAIN_GRACE = 1.0
